"""A small training loop around :func:`jlora.train.make_step`: progress bar (loss, tokens/s,
ETA), metrics appended as JSON lines, periodic evaluation, and a loss/accuracy plot."""

from __future__ import annotations

import json
import math
import os
import time
from typing import Callable, Iterator

import jax
import numpy as np


def fit(step: Callable, trainable, frozen, opt_state, batches: Iterator, num_steps: int, key, *,
        tokens_per_batch: int | None = None, log_path: str | None = None, eval_fn: Callable | None = None,
        eval_every: int | None = None, log_every: int = 10, progress: bool = True, desc: str = "train"):
    """Runs ``num_steps`` of ``step`` over ``batches``.

    Returns ``(trainable, opt_state, history)`` where ``history`` is the list of records also
    appended (one JSON object a line) to ``log_path``: ``step``, ``loss``, ``grad_norm``,
    ``steps_per_s``, ``tokens_per_s`` (when ``tokens_per_batch`` is given), ``elapsed_s``, plus
    the dict returned by ``eval_fn(trainable)`` every ``eval_every`` steps and at the end, and the
    metrics a step built with ``adapter_update`` names in ``step.log_metrics`` (e.g. AdaLoRA's
    ``adalora_rank`` and ``adalora_budget``; ``opt_state`` is then the step's ``StepState``).

    Example::

        trainable, opt_state, history = fit(step, trainable, frozen, opt_state, batches, 300,
                                            jax.random.key(0), log_path="runs/x/metrics.jsonl")
    """
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
    from tqdm.auto import tqdm

    log = open(log_path, "a") if log_path else None
    history = []
    bar = tqdm(total=num_steps, desc=desc, disable=not progress, dynamic_ncols=True)
    start = last_t = time.perf_counter()
    last_step = 0
    try:
        for i in range(1, num_steps + 1):
            try:
                batch = next(batches)
            except StopIteration:
                raise ValueError(f"the batch iterator ran out after {i - 1} of {num_steps} steps") from None
            key, sub = jax.random.split(key)
            trainable, opt_state, metrics = step(trainable, frozen, opt_state, batch, sub)
            do_eval = eval_fn is not None and ((eval_every and i % eval_every == 0) or i == num_steps)
            if i % log_every == 0 or i == num_steps or i == 1 or do_eval:
                loss = float(metrics["loss"])  # synchronises
                now = time.perf_counter()
                rate = (i - last_step) / max(now - last_t, 1e-9)
                record = {"step": i, "loss": loss, "grad_norm": float(metrics.get("grad_norm", math.nan)),
                          "steps_per_s": rate, "elapsed_s": now - start}
                if tokens_per_batch:
                    record["tokens_per_s"] = rate * tokens_per_batch
                for k in getattr(step, "log_metrics", ()):
                    if k in metrics:
                        record[k] = float(metrics[k])
                if not math.isfinite(loss):
                    raise FloatingPointError(f"loss became {loss} at step {i}")
                if do_eval:
                    record.update({f"eval_{k}": float(v) for k, v in eval_fn(trainable).items()})
                    now = time.perf_counter()
                last_t, last_step = now, i
                history.append(record)
                if log:
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                postfix = {"loss": f"{loss:.4f}"}
                if tokens_per_batch:
                    postfix["tok/s"] = f"{record['tokens_per_s']:.0f}"
                bar.set_postfix(postfix)
            bar.update(1)
    finally:
        bar.close()
        if log:
            log.close()
    return trainable, opt_state, history


def plot_history(history, path: str, title: str = "") -> str:
    """Saves loss (and any ``eval_*`` metric) against step as a PNG; returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not history:
        raise ValueError("history is empty: nothing to plot")
    counts = ("eval_examples", "eval_response_tokens")  # bookkeeping, not metrics
    evals = sorted({k for r in history for k in r if k.startswith("eval_") and k not in counts})
    fig, axes = plt.subplots(1, 1 + bool(evals), figsize=(10 if evals else 5, 3.5), squeeze=False)
    ax = axes[0, 0]
    ax.plot([r["step"] for r in history], [r["loss"] for r in history], label="train loss")
    ax.set_xlabel("step"), ax.set_ylabel("loss"), ax.grid(alpha=0.3), ax.legend()
    if evals:
        ax2 = axes[0, 1]
        for k in evals:
            pts = [(r["step"], r[k]) for r in history if k in r]
            ax2.plot(*zip(*pts), marker="o", label=k)
        ax2.set_xlabel("step"), ax2.grid(alpha=0.3), ax2.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
