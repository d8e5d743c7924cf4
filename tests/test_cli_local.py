"""`jlora train --model PATH --data FILE` on checkpoints the test writes with transformers (not the
bundled ones), from CSV / JSONL / chat-JSONL files; runs that are killed (SIGKILL, SIGTERM) and resumed
to the same final parameters; a NaN batch skipped with no non-finite checkpoint written; and the
errors for bad models, data and flags."""

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from jlora import cli
from tests._local_models import write_bert_dir, write_llama_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("local")
    llama_dir, bert_dir = write_llama_dir(d / "my_llama"), write_bert_dir(d / "my_bert")
    words = ["film", "plot", "cast", "score", "story", "scene"]
    with open(d / "reviews.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["review", "sentiment", "id"])
        for i in range(80):
            good = i % 2 == 0
            text = f"the {words[i % 6]} number {i} was " + ("wonderful and moving" if good else "dull and far too long")
            if i == 41:
                text += " tomato"   # the row test_a_nan_batch_is_skipped poisons
            w.writerow([text, "positive" if good else "negative", i])
    with open(d / "chat.jsonl", "w") as f:
        for i in range(48):
            f.write(json.dumps({"messages": [{"role": "system", "content": "You add one."},
                                             {"role": "user", "content": f"What comes after {i}?"},
                                             {"role": "assistant", "content": f"{i + 1}"}]}) + "\n")
    with open(d / "pairs.jsonl", "w") as f:
        for i in range(48):
            f.write(json.dumps({"instruction": "Add one.", "input": str(i), "output": str(i + 1)}) + "\n")
    with open(d / "notes.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["body"])
        for i in range(40):
            w.writerow([f"Note {i}: the meeting moved to room {i % 7} on day {i % 5}."])
    return d


def _adapter_arrays(run):
    from safetensors.numpy import load_file

    cli.main(["export", "--run", str(run), "--format", "peft", "--out", str(run / "peft")])
    return load_file(str(run / "peft" / "adapter_model.safetensors"))


def test_bert_directory_on_a_csv_file_trains_evaluates_and_exports(files, tmp_path, capsys):
    run = tmp_path / "bert"
    assert cli.main(["train", "--model", str(files / "my_bert"), "--data", str(files / "reviews.csv"),
                     "--text-column", "review", "--label-column", "sentiment", "--steps", "12", "--batch", "8",
                     "--lr", "5e-3", "--max-length", "16", "--out", str(run), "--no-progress"]) == 0
    results = json.loads((run / "results.json").read_text())
    assert results["test"]["examples"] == 8 and results["steps_done"] == 12       # a seeded 80/10/10 cut
    saved = json.loads((run / "config.json").read_text())
    assert saved["model"] == str(files / "my_bert") and saved["data"] == str(files / "reviews.csv")
    capsys.readouterr()
    assert cli.main(["eval", "--run", str(run), "--split", "test"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == pytest.approx(results["test"]["accuracy"])
    tensors = _adapter_arrays(run)
    assert tensors["base_model.model.bert.encoder.layer.1.attention.self.query.lora_A.weight"].shape == (8, 32)
    config = json.loads((run / "peft" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(files / "my_bert")
    # the label set comes from the data: two classes, names sorted
    from jlora.cli.tasks import make_task
    task = make_task(str(files / "my_bert"), str(files / "reviews.csv"), max_length=16, seed=0,
                     options={"text_column": "review", "label_column": "sentiment"})
    assert list(task.label_names) == ["negative", "positive"]


@pytest.mark.parametrize("data,extra", [("chat.jsonl", []), ("pairs.jsonl", []),
                                        ("notes.csv", ["--text-column", "body", "--packing"])])
def test_llama_directory_on_chat_pair_and_text_files(files, tmp_path, data, extra):
    run = tmp_path / "llama"
    assert cli.main(["train", "--model", str(files / "my_llama"), "--data", str(files / data), *extra,
                     "--steps", "8", "--batch", "4", "--lr", "1e-2", "--max-length", "48", "--out", str(run),
                     "--no-progress", "--eval-every", "4"]) == 0
    results = json.loads((run / "results.json").read_text())
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [1, 4, 8] and all(np.isfinite(l["loss"]) for l in lines)
    assert lines[-1]["eval_loss"] < lines[1]["eval_loss"]          # it learns the file
    assert results["test"]["response_tokens"] > 0
    assert "lr" in lines[-1] and lines[0]["lr"] == 0.0              # warm-up starts at 0


def test_remat_flag_reaches_the_model(files):
    """--remat (what jlora estimate suggests when activations do not fit) builds the model with
    per-layer rematerialisation; a non-boolean value in a config file is refused."""
    cfg = cli.load_config({"model": str(files / "my_llama"), "data": str(files / "chat.jsonl"), "remat": True,
                           "scan_layers": True, "max_length": 32})
    config = cli.make_task(cfg).model.config
    assert config.remat and config.scan_layers
    assert "remat" in cli.RESUMABLE_CHANGES          # it changes memory, not what is computed
    assert cli.load_config({"remat": "dots_with_no_batch_dims_saveable"})["remat"] == "dots_with_no_batch_dims_saveable"
    with pytest.raises(SystemExit, match="--remat must be true, false or a policy in .*, got 'yes'"):
        cli.load_config({"remat": "yes"})


def test_loss_chunk_trains_the_same_adapter_and_packing_keeps_examples_apart(files, tmp_path):
    """--loss-chunk, --attention xla and --fuse-projections change memory and speed, not the result:
    the same adapter as the whole-sequence loss. With --packing the rows carry segment ids into the
    model. Bad values are refused by name."""
    common = ["train", "--model", str(files / "my_llama"), "--data", str(files / "pairs.jsonl"), "--steps", "4",
              "--batch", "4", "--lr", "1e-2", "--max-length", "24", "--no-progress"]
    assert cli.main(common + ["--out", str(tmp_path / "whole")]) == 0
    assert cli.main(common + ["--loss-chunk", "7", "--out", str(tmp_path / "chunked")]) == 0
    whole, chunked = _adapter_arrays(tmp_path / "whole"), _adapter_arrays(tmp_path / "chunked")
    assert whole.keys() == chunked.keys()
    for k in whole:
        np.testing.assert_allclose(chunked[k], whole[k], rtol=1e-4, atol=1e-6, err_msg=k)
    assert cli.main(common + ["--loss-chunk", "7", "--attention", "xla", "--fuse-projections",
                              "--out", str(tmp_path / "fused")]) == 0
    for k, v in _adapter_arrays(tmp_path / "fused").items():    # other kernels, the same numbers
        np.testing.assert_allclose(v, whole[k], rtol=1e-4, atol=1e-6, err_msg=k)
    assert {"loss_chunk", "attention", "fuse_projections"} <= set(cli.RESUMABLE_CHANGES)
    cfg = cli.load_config({"model": str(files / "my_llama"), "data": str(files / "chat.jsonl"), "packing": True,
                           "max_length": 32})
    train = cli.make_task(cfg).arrays["train"]
    assert train["segment_ids"].shape == train["input_ids"].shape and train["segment_ids"].max() > 1
    with pytest.raises(SystemExit, match=r"--loss-chunk must be an integer >= 0, got -3"):
        cli.load_config({"loss_chunk": -3})
    with pytest.raises(SystemExit, match=r"--attention must be one of \('explicit', 'xla', 'cudnn'\), got 'flash'"):
        cli.load_config({"attention": "flash"})
    with pytest.raises(SystemExit, match=r"a chunked loss is for causal LMs.*bert classifier"):
        cli.make_task(cli.load_config({"model": str(files / "my_bert"), "data": str(files / "reviews.csv"),
                                       "text_column": "review", "label_column": "sentiment", "loss_chunk": 8}))


def test_chat_rows_supervise_exactly_the_assistant_turns(files):
    from jlora.data.chat import TextFormat, tokenize_conversations
    from jlora.data.instruct import IGNORE_INDEX
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(files / "my_llama" / "tokenizer.json"))
    fmt = TextFormat.from_directory(files / "my_llama")
    conv = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "See you."}]
    arrays = tokenize_conversations([conv], tok, fmt, max_length=64)
    ids, labels = arrays["input_ids"][0], arrays["labels"][0]
    n = int(arrays["attention_mask"][0].sum())
    assert tok.decode(ids[:n].tolist(), skip_special_tokens=False) == fmt.render(conv)
    supervised = tok.decode([int(t) for t in labels if t != IGNORE_INDEX], skip_special_tokens=False)
    assert supervised == "Hello!<|im_end|>\nSee you.<|im_end|>\n"


RUNNER = textwrap.dedent("""
    import os, signal, sys
    import jlora.train
    from jlora import cli
    real_fit, kill_at, sig = jlora.train.fit, int(sys.argv[1]), getattr(signal, sys.argv[2])

    def fit(step, *a, **kw):
        calls = [kw.get("start_step", 0)]
        def killing(*args):
            calls[0] += 1
            if calls[0] == kill_at:
                os.kill(os.getpid(), sig)
            return step(*args)
        killing.log_metrics = getattr(step, "log_metrics", ())
        return real_fit(killing, *a, **kw)

    jlora.train.fit = fit
    sys.exit(cli.main(sys.argv[3:]))
""")


def _run(args, kill_at=0, sig="SIGKILL", timeout=300):
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-c", RUNNER, str(kill_at), sig, *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_killed_runs_resume_to_the_same_parameters(files, tmp_path):
    common = ["train", "--model", str(files / "my_llama"), "--data", str(files / "chat.jsonl"), "--steps", "10",
              "--batch", "4", "--lr", "1e-2", "--max-length", "32", "--dropout", "0.1", "--checkpoint-every", "3",
              "--no-progress"]
    assert cli.main(common + ["--out", str(tmp_path / "whole")]) == 0
    whole = _adapter_arrays(tmp_path / "whole")

    # SIGKILL at step 8: the process dies at once; steps since the last checkpoint (6, or 3 if that
    # save had not reached the disk) are lost and recomputed
    killed = tmp_path / "killed"
    proc = _run(common + ["--out", str(killed)], kill_at=8)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not (killed / "results.json").exists() and not (killed / "adapter").exists()
    assert cli.main(common + ["--out", str(killed)]) == 0                 # a new process resumes it
    results = json.loads((killed / "results.json").read_text())
    assert results["resumed_from_step"] in (3, 6)
    steps = [json.loads(l)["step"] for l in (killed / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 10                # nothing logged twice
    resumed = _adapter_arrays(killed)
    assert whole.keys() == resumed.keys()
    for k in whole:
        np.testing.assert_array_equal(whole[k], resumed[k], err_msg=k)  # bit for bit

    # SIGTERM at step 5: a checkpoint of step 5 is written, the run exits 143, and resuming loses nothing
    termed = tmp_path / "termed"
    proc = _run(common + ["--out", str(termed)], kill_at=5, sig="SIGTERM")
    assert proc.returncode == 143 and "SIGTERM at step 5" in proc.stderr, proc.stderr[-2000:]
    assert sorted(int(p.name) for p in (termed / "checkpoints").iterdir() if p.name.isdigit())[-1] == 5
    assert cli.main(common + ["--out", str(termed)]) == 0
    assert json.loads((termed / "results.json").read_text())["resumed_from_step"] == 5
    for k, v in _adapter_arrays(termed).items():
        np.testing.assert_array_equal(whole[k], v, err_msg=k)


def test_a_nan_batch_is_skipped_and_no_checkpoint_holds_a_non_finite_value(files, tmp_path):
    import jax.numpy as jnp

    import jlora
    from jlora import io as jio

    cfg = cli.load_config(dict(model=str(files / "my_bert"), data=str(files / "reviews.csv"), text_column="review",
                               label_column="sentiment", steps=16, batch=8, max_length=16, checkpoint_every=1,
                               keep_checkpoints=20, progress=False, out=str(tmp_path / "nan")))
    task = cli.make_task(cfg)
    marker = task.tokenizer.token_to_id("tomato")
    poisoned = (task.arrays["train"]["input_ids"] == marker).any(axis=1)
    assert poisoned.sum() == 1                            # one row in 64, so 1 or 2 of 16 batches
    clean_loss = task.loss_fn

    def loss_fn(lifted):
        inner = clean_loss(lifted)

        def loss(params, batch, key):
            value, aux = inner(params, batch, key)
            return jnp.where(jnp.any(batch["input_ids"] == marker), jnp.nan, value), aux
        return loss
    task.loss_fn = loss_fn
    results = cli.train(cfg, task=task)
    assert 1 <= results["skipped_steps"] <= 2 and results["steps_done"] == 16
    trainable, frozen = jlora.partition(results["_adapted"])
    manager = jio.checkpoint_manager(tmp_path / "nan" / "checkpoints", max_to_keep=None)
    steps = manager.all_steps()
    assert len(steps) == 16
    from jlora.train import init_opt_state
    opt_template = init_opt_state(cli.make_optimizer(cfg)[0], trainable)
    extras = {"key": jax.random.key(0), "data_position": np.int32(0)}
    for s in steps:   # every state restores (checksums verified) and holds only finite numbers
        restored = jio.restore_state(manager, {"trainable": trainable, "best": None}, opt_template, extras, step=s)
        assert int(restored.rng["data_position"]) == s
        for leaf in jax.tree_util.tree_leaves((restored.trainable, restored.opt_state)):
            if np.issubdtype(np.asarray(leaf).dtype, np.floating):
                assert np.isfinite(np.asarray(leaf)).all(), s
    for leaf in jax.tree_util.tree_leaves(trainable):
        assert np.isfinite(np.asarray(leaf)).all()
    # or stop at the first one, by flag: exit non-zero, no adapter
    strict = cli.load_config({**cfg, "max_nonfinite": 1, "log_every": 1, "out": str(tmp_path / "strict")})
    with pytest.raises(SystemExit, match="training stopped, no adapter saved: 1 consecutive steps"):
        cli.train(strict, task=task)
    assert not (tmp_path / "strict" / "adapter").exists()


def test_a_run_directory_is_resumed_replaced_or_refused(files, tmp_path):
    common = ["train", "--model", str(files / "my_bert"), "--data", str(files / "reviews.csv"), "--text-column",
              "review", "--label-column", "sentiment", "--steps", "2", "--batch", "8", "--max-length", "16",
              "--no-progress"]
    run = tmp_path / "run"
    assert cli.main(common + ["--out", str(run)]) == 0
    with pytest.raises(SystemExit, match="already holds a finished run.*--overwrite"):
        cli.main(common + ["--out", str(run)])
    first = json.loads((run / "results.json").read_text())
    assert cli.main(common + ["--out", str(run), "--overwrite", "--seed", "1"]) == 0
    assert json.loads((run / "results.json").read_text())["config"]["seed"] == 1 != first["config"]["seed"]
    (run / "results.json").unlink()                        # now an interrupted run
    with pytest.raises(SystemExit, match="other settings: lr"):
        cli.main(common + ["--out", str(run), "--seed", "1", "--lr", "1e-3"])
    with pytest.raises(SystemExit, match="interrupted run; run without --no-resume"):
        cli.main(common + ["--out", str(run), "--seed", "1", "--no-resume"])
    with pytest.raises(SystemExit, match="--resume: .* holds no interrupted run"):
        cli.main(common + ["--out", str(tmp_path / "fresh"), "--resume"])
    assert cli.main(common + ["--out", str(run), "--seed", "1", "--resume"]) == 0   # explicit resume of it
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="not a jlora run"):
        cli.main(common + ["--out", str(other), "--overwrite"])
    assert (other / "notes.txt").read_text() == "mine"     # never deleted


def test_bad_models_data_and_flags_are_refused_with_the_reason(files, tmp_path):
    bert, reviews = str(files / "my_bert"), str(files / "reviews.csv")

    def refused(match, *args):
        with pytest.raises(SystemExit, match=match):
            cli.main(["train", "--no-progress", "--out", str(tmp_path / "r"), *args])
        assert not (tmp_path / "r").exists()               # nothing written for a refused run

    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    refused(r"model_type='gpt2'.*jlora runs \['bert', 'llama', 'mistral', 'qwen2', 'vit'\]", "--model", str(gpt2))
    refused("no such file or directory", "--model", str(tmp_path / "nowhere"))
    refused("has no config.json", "--model", str(tmp_path))
    refused(r"no column 'text'.*the columns are \['review', 'sentiment', 'id'\].*--text-column", "--model", bert,
            "--data", reviews)
    (tmp_path / "empty.csv").write_text("")
    refused("is empty", "--model", bert, "--data", str(tmp_path / "empty.csv"))
    refused("does not exist", "--model", bert, "--data", str(tmp_path / "missing.jsonl"))
    refused(r"unknown format '.xlsx'", "--model", bert, "--data", str(tmp_path / "sheet.xlsx"))
    refused(r"found no columns to train a language model on; the columns are \['review', 'sentiment', 'id'\]",
            "--model", str(files / "my_llama"), "--data", reviews)
    refused(r"--weight-decay must be a number >= 0, got -1.0", "--weight-decay", "-1")
    refused(r"--eval-every must be an integer >= 0, got -5", "--eval-every", "-5")
    refused(r"--eval-limit must be a positive integer, got 0", "--eval-limit", "0")
    refused(r"--best-metric needs --eval-every", "--best-metric", "loss")
    refused(r"--warmup-ratio must be a number in \[0, 1\)", "--warmup-ratio", "1.5")
    refused(r"rank", "--model", bert, "--data", reviews, "--text-column", "review", "--label-column", "sentiment",
            "--rank", "1000", "--max-length", "16")
    refused(r"targets|match", "--model", bert, "--data", reviews, "--text-column", "review", "--label-column",
            "sentiment", "--targets", "nothing_matches_this", "--max-length", "16")


@pytest.mark.parametrize("method,extra", [
    ("lora", ["--rslora", "--init", "pissa"]), ("lora", ["--param-dtype", "bfloat16"]), ("qlora", []),
    ("qlora", ["--quant", "int8", "--param-dtype", "bfloat16"]), ("dora", []), ("ia3", []),
    ("adalora", ["--init-r", "4", "--target-r", "2"]), ("tcur", []), ("head", []), ("prompt", ["--virtual-tokens", "4"]),
    ("prefix", ["--virtual-tokens", "4"]), ("ptuning", ["--virtual-tokens", "4"])])
def test_every_method_trains_evaluates_exports_and_inspects(files, tmp_path, capsys, method, extra):
    run = tmp_path / "run"
    assert cli.main(["train", "--model", str(files / "my_bert"), "--data", str(files / "reviews.csv"), "--text-column",
                     "review", "--label-column", "sentiment", "--method", method, *extra, "--steps", "3", "--batch", "8",
                     "--max-length", "16", "--lr", "1e-2", "--out", str(run), "--no-progress"]) == 0
    results = json.loads((run / "results.json").read_text())
    capsys.readouterr()
    assert cli.main(["eval", "--run", str(run), "--split", "test"]) == 0       # the saved adapter reproduces the run
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["loss"] == pytest.approx(results["test"]["loss"], rel=1e-5, abs=1e-6)
    for fmt in ("merged", "adapter"):
        assert cli.main(["export", "--run", str(run), "--format", fmt, "--out", str(tmp_path / fmt)]) == 0
        assert any((tmp_path / fmt).iterdir())
    peft = ["export", "--run", str(run), "--format", "peft", "--out", str(tmp_path / "peft")]
    if method in ("head", "tcur") or "pissa" in extra:   # a PEFT file cannot hold these: a clear refusal
        with pytest.raises(SystemExit, match="cannot export .* as peft: .*(merged|modules_to_save|PEFT files)"):
            cli.main(peft)
        return
    assert cli.main(peft) == 0
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        str(files / "my_bert")
    capsys.readouterr()
    assert cli.main(["inspect", "--run", str(run)]) == 0
    assert "trainable" in capsys.readouterr().out


def _scalars(logdir) -> dict:
    """tag -> [(step, value)] from the TensorBoard event files in ``logdir`` (TFRecord framing)."""
    import struct

    from tensorboardX.proto import event_pb2

    out = {}
    for f in sorted(logdir.glob("events.out.tfevents.*")):
        data = f.read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


def test_trainer_flags_optimizer_schedule_clipping_and_tensorboard(files, tmp_path):
    opt, schedule = cli.make_optimizer(cli.load_config(dict(steps=10, lr=1.0, schedule="constant", warmup_steps=2)))
    assert [float(schedule(i)) for i in (0, 1, 2, 9)] == [0.0, 0.5, 1.0, 1.0]
    _, schedule = cli.make_optimizer(cli.load_config(dict(steps=10, lr=1.0, schedule="linear", warmup_ratio=0.0)))
    assert float(schedule(0)) == 1.0 and float(schedule(5)) == pytest.approx(0.5) and float(schedule(10)) == 0.0
    for name in cli.OPTIMIZERS:
        cli.make_optimizer(cli.load_config(dict(optimizer=name, weight_decay=0.01, clip_norm=1.0)))
    run, logdir = tmp_path / "run", tmp_path / "tb"
    assert cli.main(["train", "--model", str(files / "my_bert"), "--data", str(files / "reviews.csv"), "--text-column",
                     "review", "--label-column", "sentiment", "--optimizer", "lion", "--schedule", "linear",
                     "--clip-norm", "0.5", "--steps", "6", "--batch", "8", "--max-length", "16", "--log-every", "2",
                     "--eval-every", "3", "--logdir", str(logdir), "--out", str(run), "--no-progress"]) == 0
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [1, 2, 3, 4, 6]
    assert lines[0]["lr"] == pytest.approx(2e-3) and 2e-3 > lines[-1]["lr"] > 0   # 0.1 x 6: no warm-up; linear decay
    assert all(l["grad_norm"] >= 0 for l in lines)
    scalars = _scalars(logdir)
    assert [s for s, _ in scalars["train/loss"]] == [1, 2, 3, 4, 6]
    assert scalars["train/loss"][-1][1] == pytest.approx(lines[-1]["loss"])
    assert [s for s, _ in scalars["eval_loss"]] == [3, 6] and "train/lr" in scalars


def test_best_metric_keeps_the_best_adapter_and_early_stopping_ends_the_run(files, tmp_path):
    run = tmp_path / "run"
    # lr so small that nothing moves: step 1 stays the best, the next evaluation does not improve on it
    assert cli.main(["train", "--model", str(files / "my_bert"), "--data", str(files / "reviews.csv"), "--text-column",
                     "review", "--label-column", "sentiment", "--steps", "20", "--batch", "8", "--max-length", "16",
                     "--lr", "1e-30", "--eval-every", "1", "--best-metric", "loss", "--early-stopping", "2",
                     "--out", str(run), "--no-progress"]) == 0
    results = json.loads((run / "results.json").read_text())
    assert results["steps_done"] == 3 and results["stopped"].startswith("early stopping: 2 evaluations")
    assert results["best"]["step"] == 1 and results["best"]["metric"] == "loss"


def test_generate_and_predict_on_runs(files, tmp_path, capsys):
    lm, clf = tmp_path / "lm", tmp_path / "clf"
    assert cli.main(["train", "--model", str(files / "my_llama"), "--data", str(files / "chat.jsonl"), "--steps", "4",
                     "--batch", "4", "--lr", "1e-2", "--max-length", "32", "--out", str(lm), "--no-progress"]) == 0
    prompts = ["What comes after 7?", "Count on from forty-one, please, and stop at forty-three?"]
    capsys.readouterr()
    assert cli.main(["generate", "--run", str(lm), "--prompt", prompts[0], "--prompt", prompts[1],
                     "--max-new-tokens", "6"]) == 0
    together = [json.loads(l) for l in capsys.readouterr().out.splitlines()]
    assert [r["prompt"] for r in together] == prompts
    (tmp_path / "p.txt").write_text(prompts[1] + "\n")
    assert cli.main(["generate", "--run", str(lm), "--prompts-file", str(tmp_path / "p.txt"), "--max-new-tokens", "6",
                     "--out", str(tmp_path / "g.jsonl")]) == 0
    alone = json.loads((tmp_path / "g.jsonl").read_text())
    assert alone == together[1]                     # left padding in a batch changes nothing
    _, task, adapted = cli._load_run(str(lm))
    import jlora
    assert task.generate(jlora.lift(task.model.apply), adapted, prompts[0], 6) == together[0]["completion"]
    with pytest.raises(SystemExit, match="is a run of a instruction task; use jlora generate"):
        cli.main(["predict", "--run", str(lm), "--text", "x"])

    assert cli.main(["train", "--model", str(files / "my_bert"), "--data", str(files / "reviews.csv"), "--text-column",
                     "review", "--label-column", "sentiment", "--steps", "6", "--batch", "8", "--lr", "1e-2",
                     "--max-length", "16", "--out", str(clf), "--no-progress"]) == 0
    results = json.loads((clf / "results.json").read_text())
    _, task, _ = cli._load_run(str(clf))
    test = task.splits["test"]
    test.to_csv(str(tmp_path / "test.csv"))
    capsys.readouterr()
    assert cli.main(["predict", "--run", str(clf), "--file", str(tmp_path / "test.csv"), "--text-column", "review"]) == 0
    preds = [json.loads(l) for l in capsys.readouterr().out.splitlines()]
    assert len(preds) == len(test) and all(abs(sum(p["probabilities"].values()) - 1) < 1e-4 for p in preds)
    names = task.label_names
    accuracy = np.mean([p["label"] == names[y] for p, y in zip(preds, test["sentiment"])])
    assert accuracy == pytest.approx(results["test"]["accuracy"])      # the same model as the run's evaluation
    with pytest.raises(SystemExit, match="is a run of a classification task; use jlora predict"):
        cli.main(["generate", "--run", str(clf), "--prompt", "x"])


def _torch_logits(directory, kind, batch):
    import torch
    import transformers

    cls = transformers.AutoModelForCausalLM if kind == "lm" else transformers.AutoModelForSequenceClassification
    model = cls.from_pretrained(str(directory), dtype=torch.float32).eval()
    with torch.no_grad():
        args = {k: torch.tensor(np.asarray(v), dtype=torch.long) for k, v in batch.items()}
        return model(**args).logits.numpy(), model


@pytest.mark.parametrize("kind,method", [("lm", "lora"), ("lm", "qlora"), ("clf", "dora")])
def test_export_hf_loads_in_transformers_with_the_same_logits(files, tmp_path, kind, method):
    import jlora

    run = tmp_path / "run"
    data = ["--model", str(files / "my_llama"), "--data", str(files / "chat.jsonl")] if kind == "lm" else \
        ["--model", str(files / "my_bert"), "--data", str(files / "reviews.csv"), "--text-column", "review",
         "--label-column", "sentiment"]
    assert cli.main(["train", *data, "--method", method, "--steps", "3", "--batch", "4", "--lr", "5e-2",
                     "--max-length", "24", "--out", str(run), "--no-progress"]) == 0
    assert cli.main(["export", "--run", str(run), "--format", "hf", "--out", str(tmp_path / "hf"),
                     "--max-shard-gb", str(2e-4)]) == 0                                 # ~215 KB shards
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1                                     # sharded, with its index
    _, task, adapted = cli._load_run(str(run))
    arrays = task.arrays["validation"]
    if kind == "lm":
        batch = {"input_ids": arrays["input_ids"][:3], "attention_mask": arrays["attention_mask"][:3]}
    else:
        batch = {k: arrays[k][:3] for k in ("input_ids", "attention_mask", "token_type_ids")}
    ours = np.asarray(task.forward(jlora.lift(task.model.apply), adapted, batch), np.float32)
    theirs, model = _torch_logits(tmp_path / "hf", kind, batch)
    if method == "qlora":   # merged to bf16 by default: the NF4 base + the update, rounded to bf16
        assert config["dtype"] == "bfloat16"
        m = batch["attention_mask"].astype(bool)
        assert np.abs(theirs - ours)[m].max() < 0.05 * np.abs(ours).max()
    else:
        mask = batch["attention_mask"].astype(bool) if kind == "lm" else np.ones(len(ours), bool)
        np.testing.assert_allclose(theirs[mask], ours[mask], atol=2e-4, rtol=2e-4)
    if kind == "clf":
        assert model.config.id2label == {0: "negative", 1: "positive"}


def test_export_hf_of_the_bundled_gguf_model_matches_in_transformers(files, tmp_path):
    """SmolLM2 comes as a Q4_1 GGUF: config.json and the tokenizer files are written from its metadata,
    and the q/k rows (un-permuted when read) must come out in the layout transformers expects."""
    import jlora

    cfg = cli.load_config(dict(model="smollm2", data=str(files / "chat.jsonl"), steps=1, batch=2, lr=1e-3,
                               max_length=24, progress=False, out=str(tmp_path / "run")))
    task = cli.make_task(cfg)          # one GGUF read (dequantising 135M weights) serves train and export
    adapted = cli.train(cfg, task=task)["_adapted"]
    cli._export("hf", str(tmp_path / "hf"), cli._portable(cfg), task, adapted)
    tok_config = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert tok_config["eos_token"] == "<|im_end|>" and "<|im_start|>" in tok_config["chat_template"]
    batch = {k: task.arrays["validation"][k][:2] for k in ("input_ids", "attention_mask")}
    ours = np.asarray(task.forward(jlora.lift(task.model.apply), adapted, batch), np.float32)
    theirs, _ = _torch_logits(tmp_path / "hf", "lm", batch)
    m = batch["attention_mask"].astype(bool)
    np.testing.assert_allclose(theirs[m], ours[m], atol=5e-3, rtol=1e-3)
    import transformers
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert text == task.text_format.render([{"role": "user", "content": "Hi"}], add_generation_prompt=True)


def test_vit_directory_on_an_image_csv_trains_evaluates_predicts_and_exports(tmp_path, capsys):
    """A ViT written with transformers + PNG files listed in a CSV (synthetic images: this checks the
    plumbing, not a result): train, eval, predict, and export to a directory transformers loads with
    the same logits."""
    import torch
    import transformers
    from PIL import Image

    torch.manual_seed(0)
    config = transformers.ViTConfig(image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=4, intermediate_size=64)
    transformers.ViTModel(config, add_pooling_layer=False).save_pretrained(tmp_path / "vit")
    (tmp_path / "vit" / "preprocessor_config.json").write_text(json.dumps(
        {"do_resize": True, "size": {"height": 16, "width": 16}, "resample": 2, "do_rescale": True,
         "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}))
    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    with open(tmp_path / "images.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "kind"])
        for i in range(40):
            red = i % 2 == 0
            pixels = rng.integers(0, 80, (24, 20, 3), dtype=np.uint8)
            pixels[..., 0 if red else 2] += 150
            Image.fromarray(pixels).save(tmp_path / "img" / f"{i}.png")
            w.writerow([f"img/{i}.png", "red" if red else "blue"])
    run = tmp_path / "run"
    assert cli.main(["train", "--model", str(tmp_path / "vit"), "--data", str(tmp_path / "images.csv"),
                     "--image-column", "path", "--label-column", "kind", "--targets", "all-linear", "--steps", "4",
                     "--batch", "8", "--lr", "1e-2", "--out", str(run), "--no-progress"]) == 0
    results = json.loads((run / "results.json").read_text())
    capsys.readouterr()
    assert cli.main(["eval", "--run", str(run), "--split", "test"]) == 0
    assert json.loads(capsys.readouterr().out)["loss"] == pytest.approx(results["test"]["loss"], rel=1e-5)
    assert cli.main(["predict", "--run", str(run), "--image", str(tmp_path / "img" / "0.png")]) == 0
    pred = json.loads(capsys.readouterr().out)
    assert set(pred["probabilities"]) == {"blue", "red"}
    assert cli.main(["export", "--run", str(run), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    _, task, adapted = cli._load_run(str(run))
    import jlora
    pixels = task.arrays["validation"]["pixels"][:3]
    ours = np.asarray(task.forward(jlora.lift(task.model.apply), adapted, {"pixels": pixels}))
    model = transformers.AutoModelForImageClassification.from_pretrained(str(tmp_path / "hf")).eval()
    with torch.no_grad():
        nchw = torch.tensor(np.asarray(task.normalise(pixels)).transpose(0, 3, 1, 2))
        theirs = model(pixel_values=nchw).logits.numpy()
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=1e-4)
    assert model.config.id2label == {0: "blue", 1: "red"}
    # jlora evaluate on an image classifier: the task metrics, and the text-only checks said to be skipped
    assert cli.main(["evaluate", "--run", str(run), "--review", "2"]) == 0
    report = json.loads((run / "evaluation" / "evaluation.json").read_text())
    assert report["task"]["adapted"]["accuracy"] == pytest.approx(results["test"]["accuracy"])
    assert "image" in report["generalisation"]["skipped"] and "image corpus" in report["forgetting"]["skipped"]
    assert (run / "evaluation" / "review.md").read_text().count("img/") == 2
