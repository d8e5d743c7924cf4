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
