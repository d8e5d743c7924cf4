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
