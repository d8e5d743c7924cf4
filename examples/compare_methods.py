"""Every jlora method on the same real tasks with the same budget and seed; writes a markdown table.

  (a) all-MiniLM-L6-v2 + Rotten Tomatoes (sentiment; the `make demo` settings: 150 steps of
      batch 16, max length 48, seed 0, warm-up + cosine schedule): head only, LoRA, DoRA, AdaLoRA,
      IA3, prompt tuning, prefix tuning (P-tuning v2) and P-tuning. Every method also trains the new
      classification head (PEFT's modules_to_save). Test accuracy and loss on the test split.
  (b) SmolLM2-135M-Instruct + ChatterBot instruction data (40 steps of batch 4, max length 96):
      LoRA, prompt tuning and prefix tuning; held-out loss on response tokens (``--eval-limit``
      validation examples) before and after.

The learning rate is the one each method is usually run with (``LR`` below; prompt methods, IA3
and AdaLoRA, whose factors start at N(0, 0.02^2) with E = 0, need larger steps); everything
else is shared. Step time is the
median-free mean over the timed steps of each run (``steps_per_s`` from ``jlora.train.fit``; the
first, compiling step excluded), measured in this process one run after another.

Writes ``--json`` (raw results) and ``--md`` (the table), by default docs/results.json and
docs/results.md::

    python examples/compare_methods.py                      # both parts
    python examples/compare_methods.py --parts a --steps 150
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent

#: learning rate per method (same steps, batch, seed and schedule for all)
LR = {"head": 2e-3, "lora": 2e-3, "dora": 2e-3, "adalora": 1e-2, "ia3": 1e-2,
      "prompt": 3e-2, "prefix": 1e-2, "ptuning": 1e-2}
LM_LR = {"lora": 1e-3, "prompt": 3e-2, "prefix": 1e-2, "prefix_vocab": 1e-2}
PART_A = ("head", "lora", "dora", "adalora", "ia3", "prompt", "prefix", "ptuning")
PART_B = ("lora", "prompt", "prefix", "prefix_vocab")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--parts", default="a,b", help="comma-separated subset of a (MiniLM) and b (SmolLM2)")
    p.add_argument("--methods", default=None, help="comma-separated subset of the methods of each part")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--virtual-tokens", type=int, default=20)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--max-length", type=int, default=48)
    p.add_argument("--lm-steps", type=int, default=40)
    p.add_argument("--lm-batch", type=int, default=4)
    p.add_argument("--lm-max-length", type=int, default=96)
    p.add_argument("--eval-limit", type=int, default=64, help="(b) held-out examples scored per split")
    p.add_argument("--out", default="runs/compare_methods", help="run directories (replaced)")
    p.add_argument("--json", default=str(ROOT / "docs" / "results.json"))
    p.add_argument("--md", default=str(ROOT / "docs" / "results.md"))
    p.add_argument("--no-progress", dest="progress", action="store_false")
    args = p.parse_args(argv)
    args.parts = [x for x in args.parts.split(",") if x]
    bad = [x for x in args.parts if x not in ("a", "b")]
    if bad:
        p.error(f"--parts takes a and/or b, got {bad}")
    if args.methods:
        args.methods = [m for m in args.methods.split(",") if m]
        unknown = [m for m in args.methods if m not in PART_A + PART_B]
        if unknown:
            p.error(f"unknown methods {unknown}; known: {sorted(set(PART_A + PART_B))}")
    return args


def machine() -> dict:
    import jax

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                    capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    return {"date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
            "platform": platform.platform(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "jax": jax.__version__, "backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
            "git_commit": commit, "jlora_dirty": dirty}


def _method_cfg(method: str, args, lm: bool) -> dict:
    cfg = {"method": "prefix" if method == "prefix_vocab" else method, "rank": args.rank, "alpha": args.alpha, "virtual_tokens": args.virtual_tokens,
           "lr": (LM_LR if lm else LR)[method]}
    if method == "prefix_vocab":  # start from the keys/values of 20 random real tokens (not PEFT's N(0,1))
        cfg.update(prefix_init="vocab")
    if method == "adalora":  # PEFT's defaults (init_r 12 -> target_r 8); warm-up 10 %, final phase 20 %
        steps = args.lm_steps if lm else args.steps
        cfg.update(init_r=12, target_r=8, tinit=max(1, steps // 10), tfinal=max(1, steps // 5))
    return cfg


def _summary(r: dict) -> dict:
    keep = ("trainable_params", "total_params", "trainable_percent", "adapter_bytes_on_disk", "validation", "test",
            "final_train_loss", "steps_per_s", "setup_s", "wall_s")
    out = {k: r.get(k) for k in keep}
    out["lr"] = r["config"]["lr"]
    if "adalora_ranks" in r:
        out["adalora_ranks"] = r["adalora_ranks"]
    return out


def _selected(methods, args):
    return [m for m in methods if not args.methods or m in args.methods]


def _run_methods(part: str, methods, common: dict, task, out: pathlib.Path, args, lm: bool) -> dict:
    """Trains every selected method of one part through ``jlora.cli.train`` on the shared task."""
    import jax

    from jlora import cli

    runs = {}
    for method in _selected(methods, args):
        cfg = cli.load_config({**common, **_method_cfg(method, args, lm=lm), "out": str(out / method)})
        print(f"\n== ({part}) {method}: {cfg['steps']} steps of batch {cfg['batch']}, lr {cfg['lr']} ==", flush=True)
        r = cli.train(cfg, task=task)
        runs[method] = _summary(r)
        del r
        jax.clear_caches()
    return runs


def part_a(args) -> dict:
    from jlora.cli.tasks import ClassificationTask

    out = pathlib.Path(args.out) / "minilm_rt"
    if out.exists():
        shutil.rmtree(out)
    t0 = time.perf_counter()
    task = ClassificationTask(data="rotten_tomatoes", max_length=args.max_length, seed=args.seed)
    print(f"(a) Rotten Tomatoes + all-MiniLM-L6-v2 loaded in {time.perf_counter() - t0:.0f} s", flush=True)
    common = dict(model="minilm", data="rotten_tomatoes", targets="default", steps=args.steps, batch=args.batch,
                  max_length=args.max_length, seed=args.seed, progress=args.progress)
    runs = _run_methods("a", PART_A, common, task, out, args, lm=False)
    return {"task": "all-MiniLM-L6-v2 + Rotten Tomatoes (sentiment, 2 classes)", "settings": common, "runs": runs}


def part_b(args) -> dict:
    import jlora
    from jlora.cli.tasks_lm import InstructionTask

    out = pathlib.Path(args.out) / "smollm2_chat"
    if out.exists():
        shutil.rmtree(out)
    t0 = time.perf_counter()
    task = InstructionTask(data="chatterbot", max_length=args.lm_max_length, seed=args.seed)
    print(f"(b) ChatterBot + SmolLM2-135M-Instruct loaded in {time.perf_counter() - t0:.0f} s", flush=True)
    before = task.evaluate(jlora.lift(task.model.apply), task.params, "validation", limit=args.eval_limit)
    common = dict(model="smollm2", data="chatterbot", targets="default", steps=args.lm_steps, batch=args.lm_batch,
                  max_length=args.lm_max_length, seed=args.seed, eval_limit=args.eval_limit, progress=args.progress)
    runs = _run_methods("b", PART_B, common, task, out, args, lm=True)
    return {"task": "SmolLM2-135M-Instruct + ChatterBot (instruction tuning, loss on response tokens)",
            "settings": common, "before": before, "runs": runs}


NAMES = {"head": "head only (frozen encoder)", "lora": "LoRA r=8", "dora": "DoRA r=8",
         "adalora": "AdaLoRA r 12→8", "ia3": "IA3", "prompt": "prompt tuning", "prefix": "prefix tuning (P-tuning v2)",
         "ptuning": "P-tuning (MLP encoder)", "prefix_vocab": "prefix tuning, init from real tokens"}


def _ms(r):
    return f"{1000.0 / r['steps_per_s']:.1f}" if r.get("steps_per_s") else "-"


def to_markdown(res: dict) -> str:
    m = res["machine"]
    lines = ["# jlora methods on real tasks", "",
             f"Generated by `{res['command']}` on {m['date_utc']} UTC: {m['backend']} ({m['device_kind']}), "
             f"{m['cpu_count']} CPU cores, jax {m['jax']}, jlora `{m['git_commit']}`"
             f"{' (uncommitted changes)' if m.get('jlora_dirty') else ''}. One seed ({res['seed']}) per method; "
             "same steps, batch, schedule and data order for every method, the learning rate per method "
             "(column lr). Step time: mean over the timed training steps (compilation excluded).", ""]
    a = res.get("a")
    if a:
        s = a["settings"]
        lines += [f"## (a) {a['task']}", "",
                  f"{s['steps']} steps of batch {s['batch']}, max length {s['max_length']}; test split. Every "
                  "method also trains the new 2-class head (770 parameters).", "",
                  "| method | trainable params | % of model | lr | test accuracy | test loss | step time (ms) |",
                  "|---|---|---|---|---|---|---|"]
        for k, r in a["runs"].items():
            t = r["test"]
            lines.append(f"| {NAMES.get(k, k)} | {r['trainable_params']:,} | {r['trainable_percent']:.3f} % | "
                         f"{r['lr']:g} | {t['accuracy']:.4f} | {t['loss']:.4f} | {_ms(r)} |")
        lines.append("")
        runs = a["runs"]
        if "lora" in runs and "dora" in runs and runs["lora"].get("steps_per_s") and runs["dora"].get("steps_per_s"):
            lines += [f"DoRA's training step takes ×{runs['lora']['steps_per_s'] / runs['dora']['steps_per_s']:.2f} "
                      "LoRA's here (benchmarks/dora_step.py isolates the step, with PEFT's materialised norm "
                      "for comparison).", ""]
    b = res.get("b")
    if b:
        s = b["settings"]
        lines += [f"## (b) {b['task']}", "",
                  f"{s['steps']} steps of batch {s['batch']}, max length {s['max_length']}; held-out = the first "
                  f"{s['eval_limit']} validation examples (loss before training: {b['before']['loss']:.4f}).", "",
                  "| method | trainable params | % of model | lr | held-out loss | test loss | step time (ms) |",
                  "|---|---|---|---|---|---|---|"]
        for k, r in b["runs"].items():
            v = r["validation"].get("eval_loss")
            lines.append(f"| {NAMES.get(k, k)} | {r['trainable_params']:,} | {r['trainable_percent']:.3f} % | "
                         f"{r['lr']:g} | {v:.4f} | {r['test']['loss']:.4f} | {_ms(r)} |")
        lines.append("")
    lines += ["Raw numbers: [`results.json`](results.json).", ""]
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    res = {"command": "python examples/compare_methods.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "machine": machine(), "seed": args.seed}
    if "a" in args.parts:
        res["a"] = part_a(args)
    if "b" in args.parts:
        res["b"] = part_b(args)
    pathlib.Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.json).write_text(json.dumps(res, indent=1, default=str) + "\n")
    pathlib.Path(args.md).write_text(to_markdown(res))
    print(to_markdown(res))
    return res


if __name__ == "__main__":
    main()
