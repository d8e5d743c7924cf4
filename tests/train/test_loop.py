"""fit(): JSON-lines metrics, evaluation records, plot, and clear errors."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlora
from jlora.train import fit, make_step, plot_history, read_jsonl


def _setup():
    rng = np.random.default_rng(0)
    w_true = rng.standard_normal((6, 1)).astype(np.float32)
    x = rng.standard_normal((64, 6)).astype(np.float32)
    params = {"params": {"w": {"kernel": jnp.zeros((6, 1))}}}
    adapted = jlora.mark_trainable(params, r".*kernel")
    trainable, frozen = jlora.partition(adapted)

    def loss_fn(p, batch, key):
        xb, yb = batch
        return jnp.mean((xb @ jlora.merge(p)["params"]["w"]["kernel"] - yb) ** 2)

    opt = optax.sgd(0.1)

    def batches():
        while True:
            yield (x, x @ w_true)

    return make_step(loss_fn, opt), trainable, frozen, opt.init(trainable), batches(), (x, x @ w_true)


def test_fit_logs_jsonl_evaluates_and_plots(tmp_path):
    step, trainable, frozen, opt_state, batches, (x, y) = _setup()
    evals = []

    def eval_fn(t):
        evals.append(1)
        w = t["params"]["w"]["kernel"].value
        return {"mse": float(jnp.mean((x @ w - y) ** 2))}

    log = tmp_path / "metrics.jsonl"
    trainable, opt_state, history = fit(step, trainable, frozen, opt_state, batches, 40, jax.random.key(0),
                                        tokens_per_batch=64, log_path=str(log), eval_fn=eval_fn, eval_every=20,
                                        log_every=10, progress=False)
    records = read_jsonl(str(log))
    assert records == json.loads(json.dumps(history))
    assert [r["step"] for r in records] == [1, 10, 20, 30, 40]
    assert len(evals) == 2 and "eval_mse" in records[2] and "eval_mse" in records[4]
    assert records[-1]["loss"] < 0.1 * records[0]["loss"]
    assert all(r["tokens_per_s"] > 0 for r in records)
    png = plot_history(history, str(tmp_path / "plot.png"))
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_fit_errors():
    step, trainable, frozen, opt_state, _, _ = _setup()
    with pytest.raises(ValueError, match="ran out after 2 of 5"):
        fit(step, trainable, frozen, opt_state, iter([None] * 0 + [(np.ones((4, 6), np.float32), np.ones((4, 1), np.float32))] * 2),
            5, jax.random.key(0), progress=False)
    with pytest.raises(ValueError, match="num_steps"):
        fit(step, trainable, frozen, opt_state, iter([]), 0, jax.random.key(0), progress=False)
    with pytest.raises(ValueError, match="empty"):
        plot_history([], "/tmp/x.png")


def test_fit_logs_the_adapter_update_metrics(tmp_path):
    import flax.linen as nn

    x = jax.random.normal(jax.random.key(0), (64, 16))
    y = jnp.sin(x[:, :8])
    model = nn.Dense(8)
    params = model.init(jax.random.key(1), x)
    spec = jlora.AdaLoRA(init_r=4, target_r=1, total_steps=12, tinit=2, targets=r".*kernel")
    trainable, frozen = jlora.partition(jlora.apply(params, spec, key=jax.random.key(2)))
    forward = jlora.lift(model.apply)
    alloc = jlora.adalora_allocator(spec)
    step = make_step(lambda p, b, k: jnp.mean((forward(p, b[0]) - b[1]) ** 2), optax.adam(1e-2), adapter_update=alloc)

    def batches():
        while True:
            yield (x, y)

    trainable, opt_state, history = fit(step, trainable, frozen, step.init(trainable), batches(), 12,
                                        jax.random.key(0), log_every=1, progress=False,
                                        log_path=str(tmp_path / "m.jsonl"))
    records = read_jsonl(str(tmp_path / "m.jsonl"))
    assert [r["adalora_budget"] for r in records][:3] == [4, 4, 4] and records[-1]["adalora_budget"] == 1
    assert records[2]["adalora_rank"] == 4 and records[-1]["adalora_rank"] == 1
    assert all("adapter_loss" in r for r in records)
    assert isinstance(opt_state, jlora.train.StepState) and int(opt_state.step) == 12


def _with_bad_batches(good, bad_steps):
    """Yields the good batch, except NaN inputs at the 1-based steps in ``bad_steps``."""
    x, y = good
    i = 0
    while True:
        i += 1
        yield (x * np.nan, y) if i in bad_steps else (x, y)


def test_fit_counts_skipped_steps_and_keeps_training(tmp_path):
    step, trainable, frozen, opt_state, _, good = _setup()
    log = tmp_path / "m.jsonl"
    trainable, opt_state, history = fit(step, trainable, frozen, opt_state, _with_bad_batches(good, {3, 7, 8}), 20,
                                        jax.random.key(0), log_every=5, progress=False, log_path=str(log))
    assert [r["skipped"] for r in history] == [0, 1, 3, 3, 3]
    w = np.asarray(trainable["params"]["w"]["kernel"].value)
    assert np.isfinite(w).all() and history[-1]["loss"] < 0.1 * history[0]["loss"]
    jio_path = jlora.io.save_adapter(str(tmp_path / "adapter"), jlora.combine(trainable, frozen))
    assert jlora.io.read_adapter_metadata(jio_path)["trainables"]


def test_fit_stops_a_run_that_keeps_skipping():
    step, trainable, frozen, opt_state, _, good = _setup()
    with pytest.raises(FloatingPointError, match=r"3 consecutive steps \(4\.\.6\).*parameters are those of step 3"):
        fit(step, trainable, frozen, opt_state, _with_bad_batches(good, {4, 5, 6}), 12, jax.random.key(0),
            log_every=2, progress=False, max_consecutive_skips=3)
    with pytest.raises(ValueError, match="max_consecutive_skips must be a positive int, got 0"):
        fit(step, trainable, frozen, opt_state, _with_bad_batches(good, ()), 2, jax.random.key(0),
            progress=False, max_consecutive_skips=0)


def test_fit_without_skipping_raises_on_a_nonfinite_loss():
    _, trainable, frozen, opt_state, _, good = _setup()

    def loss_fn(p, batch, key):
        xb, yb = batch
        return jnp.mean((xb @ jlora.merge(p)["params"]["w"]["kernel"] - yb) ** 2)

    raw = make_step(loss_fn, optax.sgd(0.1), skip_nonfinite=False)
    with pytest.raises(FloatingPointError, match="loss became nan at step 1.*parameters are lost"):
        fit(raw, trainable, frozen, opt_state, _with_bad_batches(good, {1}), 3, jax.random.key(0), progress=False)


def test_fit_stops_a_diverging_run_and_logs_window_means():
    step, trainable, frozen, opt_state, batches, _ = _setup()
    _, _, history = fit(step, trainable, frozen, opt_state, batches, 10, jax.random.key(0), log_every=5,
                        progress=False, diverge_factor=10.0)
    assert [r["step"] for r in history] == [1, 5, 10]
    assert history[0]["loss_mean"] == pytest.approx(history[0]["loss"])
    assert history[1]["loss_mean"] > history[1]["loss"]  # steps 2..5 of a decreasing loss average above step 5

    _, trainable, frozen, _, batches, _ = _setup()

    def loss_fn(p, batch, key):
        xb, yb = batch
        return jnp.mean((xb @ jlora.merge(p)["params"]["w"]["kernel"] - yb) ** 2)

    wild = make_step(loss_fn, optax.sgd(5.0))  # finite but exploding: no step is skipped
    with pytest.raises(FloatingPointError, match=r"diverged: mean loss .* over steps 2\.\.4 .* diverge_factor=10"):
        fit(wild, trainable, frozen, optax.sgd(5.0).init(trainable), batches, 20, jax.random.key(0),
            log_every=4, progress=False, diverge_factor=10.0)
    with pytest.raises(ValueError, match="diverge_factor must be a number > 1"):
        fit(wild, trainable, frozen, optax.sgd(5.0).init(trainable), batches, 2, jax.random.key(0),
            progress=False, diverge_factor=0.5)


def test_fit_checkpoints_and_resumes_to_the_same_parameters(tmp_path):
    """fit(checkpoint=..., start_step=...) with jlora.io save/restore and a positioned data stream:
    8 steps in one go == 5 steps, a restore, and 3 more (dropout-like randomness included)."""
    from jlora import io as jio
    from jlora.data import batches

    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 6)).astype(np.float32)
    arrays = {"x": x, "y": x @ rng.standard_normal((6, 1)).astype(np.float32)}
    def fresh():   # the step donates its inputs: every run starts from new arrays
        return jlora.partition(jlora.mark_trainable({"params": {"w": {"kernel": jnp.zeros((6, 1))}}}, r".*kernel"))

    trainable, frozen = fresh()

    def loss_fn(p, batch, key):
        noise = 1 + 0.1 * jax.random.normal(key, batch["y"].shape)   # uses the step key
        return jnp.mean((batch["x"] @ jlora.merge(p)["params"]["w"]["kernel"] - batch["y"] * noise) ** 2)

    opt = optax.adam(0.05)
    step = make_step(loss_fn, opt)
    full, _, _ = fit(step, trainable, frozen, opt.init(trainable), batches(arrays, 8, seed=3, epochs=None), 8,
                     jax.random.key(1), progress=False)

    manager = jio.checkpoint_manager(tmp_path / "ckpt")
    saved = []

    def checkpoint(i, t, o, k):
        saved.append(i)
        jio.save_state(manager, i, t, o, {"key": k, "data_position": np.int32(i)}, wait=True)

    calls = {"n": 0}

    def stop():
        calls["n"] += 1
        return "test stop" if calls["n"] == 5 else None

    trainable, frozen = fresh()
    t, o, hist = fit(step, trainable, frozen, opt.init(trainable), batches(arrays, 8, seed=3, epochs=None), 8,
                     jax.random.key(1), progress=False, checkpoint=checkpoint, checkpoint_every=2, should_stop=stop)
    assert saved == [2, 4, 5] and hist[-1]["step"] == 5 and hist[-1]["stopped"] == "test stop"
    trainable, frozen = fresh()
    r = jio.restore_state(manager, trainable, opt.init(trainable), {"key": jax.random.key(0), "data_position": np.int32(0)})
    assert r.step == 5 and int(r.rng["data_position"]) == 5
    resumed, _, hist2 = fit(step, r.trainable, frozen, r.opt_state, batches(arrays, 8, seed=3, epochs=None, start=5), 8,
                            r.rng["key"], progress=False, start_step=5, reference_loss=hist[0]["loss"],
                            checkpoint=checkpoint)
    assert hist2[0]["step"] == 8 and saved[-1] == 8
    for a, b in zip(jax.tree_util.tree_leaves(full), jax.tree_util.tree_leaves(resumed)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    trainable, frozen = fresh()
    with pytest.raises(ValueError, match="start_step must be an int in"):
        fit(step, trainable, frozen, opt.init(trainable), iter([]), 8, jax.random.key(1), start_step=8)
