"""Counts for issue 13's closing note: bad inputs tried / handled, corruptions tried / refused /
silently wrong, kill-resume trials / steps lost. Runs on CPU in a few minutes on tiny checkpoints
written with transformers (tests/_local_models.py) and prints one JSON object.

    .venv/bin/python tools/robustness.py [--kill-trials 4] [--out counts.json]

"handled" means the command exited with a one-line ``jlora: ...`` message (no traceback) and left no
run directory behind; "refused" means loading raised an error naming the damage; "silently wrong"
means it loaded and the model's outputs differ from the undamaged run's.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _write_data(d: pathlib.Path) -> None:
    with open(d / "reviews.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["review", "sentiment"])
        for i in range(80):
            w.writerow([f"the film number {i} was " + ("wonderful" if i % 2 == 0 else "dull"),
                        "positive" if i % 2 == 0 else "negative"])
    with open(d / "chat.jsonl", "w") as f:
        for i in range(48):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"What comes after {i}?"},
                                             {"role": "assistant", "content": f"{i + 1}"}]}) + "\n")
    (d / "empty.csv").write_text("")
    (d / "header.csv").write_text("review,sentiment\n")
    (d / "broken.jsonl").write_text('{"text": "a"}\n{oops\n')
    (d / "one_label.csv").write_text("text,label\n" + "".join(f"t{i},x\n" for i in range(30)))
    gpt2 = d / "gpt2"
    gpt2.mkdir(exist_ok=True)
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    notok = d / "no_tokenizer"
    notok.mkdir(exist_ok=True)
    (notok / "config.json").write_text(json.dumps({"model_type": "llama"}))


def bad_inputs(d: pathlib.Path) -> dict:
    from jlora import cli

    bert, llama, rev = str(d / "my_bert"), str(d / "my_llama"), str(d / "reviews.csv")
    cols = ["--text-column", "review", "--label-column", "sentiment"]
    cases = {
        "model: unknown name": ["--model", "gpt5"],
        "model: unsupported model_type": ["--model", str(d / "gpt2")],
        "model: directory without tokenizer.json": ["--model", str(d / "no_tokenizer")],
        "model: missing .gguf": ["--model", str(d / "x.gguf")],
        "data: unknown name": ["--data", "imdb"],
        "data: missing file": ["--model", bert, "--data", str(d / "nope.csv")],
        "data: empty file": ["--model", bert, "--data", str(d / "empty.csv")],
        "data: header only": ["--model", bert, "--data", str(d / "header.csv")],
        "data: broken jsonl": ["--model", llama, "--data", str(d / "broken.jsonl")],
        "data: unknown suffix": ["--model", bert, "--data", str(d / "x.xlsx")],
        "data: wrong columns (classification)": ["--model", bert, "--data", rev],
        "data: wrong columns (LM)": ["--model", llama, "--data", rev],
        "data: --text-column not in file": ["--model", bert, "--data", rev, "--text-column", "body"],
        "data: one label only": ["--model", bert, "--data", str(d / "one_label.csv")],
        "data: missing validation file": ["--model", bert, "--data", rev, *cols, "--validation-file", str(d / "v.csv")],
        "flag: --rank 1000": ["--model", bert, "--data", rev, *cols, "--rank", "1000"],
        "flag: --rank 0": ["--rank", "0"],
        "flag: --targets x": ["--model", bert, "--data", rev, *cols, "--targets", "x"],
        "flag: --weight-decay -1": ["--weight-decay", "-1"],
        "flag: --eval-every -5": ["--eval-every", "-5"],
        "flag: --eval-limit 0": ["--eval-limit", "0"],
        "flag: --lr 0": ["--lr", "0"],
        "flag: --lr nan": ["--lr", "nan"],
        "flag: --dropout 1.5": ["--dropout", "1.5"],
        "flag: --batch 8 --accum-steps 3": ["--batch", "8", "--accum-steps", "3"],
        "flag: --warmup-steps 500 of 300": ["--warmup-steps", "500"],
        "flag: --best-metric without --eval-every": ["--best-metric", "loss"],
        "flag: --best-metric bleu": ["--best-metric", "bleu", "--eval-every", "5"],
        "flag: --early-stopping without --best-metric": ["--early-stopping", "3"],
        "flag: --max-length 0": ["--max-length", "0"],
        "flag: --keep-checkpoints 0": ["--keep-checkpoints", "0"],
        "flag: --method head on a decoder": ["--model", llama, "--data", str(d / "chat.jsonl"), "--method", "head"],
        "config: unknown key": ["--config", str(d / "bad.yaml")],
    }
    (d / "bad.yaml").write_text("rnak: 4\n")
    out = {"tried": 0, "handled": 0, "unhandled": []}
    for name, args in cases.items():
        run = d / "bad_run"
        shutil.rmtree(run, ignore_errors=True)
        out["tried"] += 1
        try:
            cli.main(["train", "--no-progress", "--steps", "2", "--out", str(run), *args])
            out["unhandled"].append(f"{name}: accepted")
        except SystemExit as e:
            if isinstance(e.code, str) and e.code.startswith("jlora:") and not run.exists():
                out["handled"] += 1
            else:
                out["unhandled"].append(f"{name}: exit {e.code!r}, run dir left: {run.exists()}")
        except Exception as e:  # noqa: BLE001 - a traceback is what this counts
            out["unhandled"].append(f"{name}: {type(e).__name__}: {str(e)[:120]}")
    return out


def _flip(path: pathlib.Path, n: int = 64, seed: int = 0) -> None:
    data = bytearray(path.read_bytes())
    rng = random.Random(seed)
    for _ in range(n):
        i = rng.randrange(len(data))
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _largest(d: pathlib.Path, pattern: str = "*") -> pathlib.Path:
    return max((p for p in d.rglob(pattern) if p.is_file()), key=lambda p: p.stat().st_size)


def _data_files(d: pathlib.Path) -> list[pathlib.Path]:
    """The array data files of an Orbax (OCDBT) directory: everything under a ``d/`` folder."""
    return sorted(p for p in d.rglob("*") if p.is_file() and p.parent.name == "d")


def _each(d: pathlib.Path, fn) -> None:
    for p in _data_files(d):
        fn(p)


def corruptions(d: pathlib.Path) -> dict:
    import numpy as np

    import jlora
    from jlora import cli

    base = d / "good"
    shutil.rmtree(base, ignore_errors=True)
    cli.main(["train", "--model", str(d / "my_bert"), "--data", str(d / "reviews.csv"), "--text-column", "review",
              "--label-column", "sentiment", "--steps", "6", "--batch", "8", "--max-length", "16", "--lr", "1e-2",
              "--checkpoint-every", "2", "--keep-checkpoints", "3", "--out", str(base), "--no-progress"])
    cli.main(["export", "--run", str(base), "--format", "peft", "--out", str(base / "peft")])
    _, task, good = cli._load_run(str(base))
    batch = {k: task.arrays["validation"][k][:8] for k in ("input_ids", "attention_mask", "token_type_ids")}
    lifted = jlora.lift(task.model.apply)
    reference = np.asarray(task.forward(lifted, good, batch))

    def adapter_edit(field, value):
        def go(run):
            meta = json.loads((run / "adapter" / "jlora_adapter.json").read_text())
            node = meta["nodes"][0]
            if field == "scale":
                node["adapters"][0]["scale"] = value
            elif field == "active":
                node["active"] = value
            else:
                node["base_dtype"] = value
            (run / "adapter" / "jlora_adapter.json").write_text(json.dumps(meta))
        return go

    def peft_edit(field, value):
        def go(run):
            cfg = json.loads((run / "peft" / "adapter_config.json").read_text())
            cfg[field] = value
            (run / "peft" / "adapter_config.json").write_text(json.dumps(cfg))
        return go

    def newest_ckpt(run):
        return run / "checkpoints" / str(max(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit()))

    cases = {
        "adapter: 64 flipped bytes in every array data file": ("adapter", lambda r: _each(r / "adapter" / "arrays", _flip)),
        "adapter: every array data file truncated to half": ("adapter", lambda r: _each(
            r / "adapter" / "arrays", lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]))),
        "adapter: the array data files deleted": ("adapter", lambda r: _each(r / "adapter" / "arrays", pathlib.Path.unlink)),
        "adapter: jlora_adapter.json scale edited": ("adapter", adapter_edit("scale", 5.0)),
        "adapter: jlora_adapter.json active emptied": ("adapter", adapter_edit("active", [])),
        "adapter: jlora_adapter.json dtype edited": ("adapter", adapter_edit("dtype", "float16")),
        "adapter: jlora_adapter.json truncated": ("adapter", lambda r: (r / "adapter" / "jlora_adapter.json").write_text(
            (r / "adapter" / "jlora_adapter.json").read_text()[:200])),
        "checkpoint: newest step, 64 flipped bytes in its data files": ("resume", lambda r: _each(newest_ckpt(r), _flip)),
        "checkpoint: newest step's data files emptied": ("resume", lambda r: _each(newest_ckpt(r),
                                                                                   lambda p: p.write_bytes(b""))),
        "checkpoint: newest step's metadata deleted": ("resume", lambda r: [p.unlink() for p in newest_ckpt(r).rglob(
            "*") if p.is_file() and "jlora" in str(p.relative_to(newest_ckpt(r)))]),
        "peft: r edited": ("peft", peft_edit("r", 4)),
        "peft: lora_alpha as a string": ("peft", peft_edit("lora_alpha", "16")),
        "peft: use_rslora as a string": ("peft", peft_edit("use_rslora", "yes")),
        "peft: target_modules leaves a module out": ("peft", peft_edit("target_modules", ["query"])),
        "peft: safetensors truncated": ("peft", lambda r: (r / "peft" / "adapter_model.safetensors").write_bytes(
            (r / "peft" / "adapter_model.safetensors").read_bytes()[:300])),
        "peft: 64 flipped bytes in the tensor data": ("peft", lambda r: _flip_tail(r / "peft" / "adapter_model.safetensors")),
        "peft: lora_alpha edited (a valid number)": ("peft", peft_edit("lora_alpha", 64)),
    }
    out = {"tried": 0, "refused": 0, "silently_wrong": 0, "unchanged": 0, "details": {}}
    for name, (kind, damage) in cases.items():
        run = d / "damaged"
        shutil.rmtree(run, ignore_errors=True)
        shutil.copytree(base, run)
        (run / "results.json").unlink() if kind == "resume" else None
        damage(run)
        out["tried"] += 1
        try:
            if kind == "adapter":
                _, task2, adapted = cli._load_run(str(run))
            elif kind == "peft":
                from jlora.io import load_peft
                _, task2, _ = cli._load_run(str(base))
                adapted = load_peft(str(run / "peft"), cli._cast_frozen(task2.params, "float32", task2.head),
                                    task2.naming)
            else:   # resume from the damaged newest checkpoint: must fall back to the one before
                import warnings
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    cli.main(["train", "--model", str(d / "my_bert"), "--data", str(d / "reviews.csv"), "--text-column",
                              "review", "--label-column", "sentiment", "--steps", "6", "--batch", "8", "--max-length",
                              "16", "--lr", "1e-2", "--checkpoint-every", "2", "--keep-checkpoints", "3", "--out",
                              str(run), "--no-progress"])
                resumed = json.loads((run / "results.json").read_text())["resumed_from_step"]
                fell_back = any("damaged" in str(w.message) for w in caught)
                _, task2, adapted = cli._load_run(str(run))
                same = np.allclose(np.asarray(task2.forward(lifted, adapted, batch)), reference, atol=1e-5)
                verdict = "refused" if fell_back and same else ("silently_wrong" if not same else "unchanged")
                out[verdict] += 1
                out["details"][name] = f"{verdict} (resumed from step {resumed}, final model {'==' if same else '!='} "\
                                       f"uninterrupted)"
                continue
            got = np.asarray(task2.forward(lifted, adapted, batch))
            same = np.allclose(got, reference, atol=1e-5)
            out["unchanged" if same else "silently_wrong"] += 1
            out["details"][name] = "loaded, outputs " + ("unchanged" if same else "DIFFER")
        except SystemExit as e:
            out["refused"] += 1
            out["details"][name] = f"refused: {str(e.code)[:140]}"
        except Exception as e:  # noqa: BLE001
            out["refused"] += 1
            out["details"][name] = f"refused: {type(e).__name__}: {str(e)[:140]}"
    return out


def _flip_tail(path: pathlib.Path) -> None:
    """Flips bytes in the tensor data of a safetensors file (after its JSON header)."""
    import struct

    data = bytearray(path.read_bytes())
    start = 8 + struct.unpack("<Q", bytes(data[:8]))[0]
    rng = random.Random(0)
    for _ in range(64):
        data[rng.randrange(start, len(data))] ^= 0xFF
    path.write_bytes(bytes(data))


RUNNER = textwrap.dedent("""
    import os, signal, sys
    import jlora.train
    from jlora import cli
    real, kill_at = jlora.train.fit, int(sys.argv[1])
    def fit(step, *a, **kw):
        n = [kw.get("start_step", 0)]
        def killing(*args):
            n[0] += 1
            if n[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return step(*args)
        killing.log_metrics = getattr(step, "log_metrics", ())
        return real(killing, *a, **kw)
    jlora.train.fit = fit
    sys.exit(cli.main(sys.argv[2:]))
""")


def kill_resume(d: pathlib.Path, trials: int, every: int = 4, steps: int = 20) -> dict:
    import numpy as np
    from safetensors.numpy import load_file

    from jlora import cli

    common = ["train", "--model", str(d / "my_llama"), "--data", str(d / "chat.jsonl"), "--steps", str(steps),
              "--batch", "4", "--max-length", "32", "--lr", "1e-2", "--dropout", "0.1", "--checkpoint-every",
              str(every), "--no-progress"]
    whole = d / "whole"
    shutil.rmtree(whole, ignore_errors=True)
    cli.main(common + ["--out", str(whole)])
    cli.main(["export", "--run", str(whole), "--format", "peft", "--out", str(whole / "peft")])
    ref = load_file(str(whole / "peft" / "adapter_model.safetensors"))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    out = {"trials": 0, "identical_final_params": 0, "steps_lost": [], "max_steps_lost_allowed": every, "kills": []}
    rng = random.Random(1)
    for t in range(trials):
        run = d / f"killed{t}"
        shutil.rmtree(run, ignore_errors=True)
        kill_at = rng.randrange(2, steps)
        p = subprocess.run([sys.executable, "-c", RUNNER, str(kill_at), *common, "--out", str(run)], env=env,
                           capture_output=True, text=True, timeout=600)
        assert p.returncode == -signal.SIGKILL, p.stderr[-500:]
        p = subprocess.run([sys.executable, "-m", "jlora.cli", *common, "--out", str(run)], env=env,
                           capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stderr[-800:]
        resumed = json.loads((run / "results.json").read_text())["resumed_from_step"] or 0
        cli.main(["export", "--run", str(run), "--format", "peft", "--out", str(run / "peft")])
        got = load_file(str(run / "peft" / "adapter_model.safetensors"))
        out["trials"] += 1
        out["identical_final_params"] += all(np.array_equal(ref[k], got[k]) for k in ref)
        out["steps_lost"].append((kill_at - 1) - resumed)     # steps completed before the kill, not in a checkpoint
        out["kills"].append({"killed_during_step": kill_at, "resumed_from": resumed})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kill-trials", type=int, default=4)
    parser.add_argument("--out")
    args = parser.parse_args()
    from tests._local_models import write_bert_dir, write_llama_dir

    d = pathlib.Path(tempfile.mkdtemp(prefix="jlora-robustness-"))
    try:
        write_llama_dir(d / "my_llama")
        write_bert_dir(d / "my_bert")
        _write_data(d)
        result = {"bad_inputs": bad_inputs(d), "corruptions": corruptions(d),
                  "kill_resume": kill_resume(d, args.kill_trials)}
    finally:
        shutil.rmtree(d, ignore_errors=True)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        pathlib.Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
