"""A small training loop around :func:`jlora.train.make_step`: progress bar (loss, tokens/s,
ETA), metrics appended as JSON lines, periodic evaluation, and a loss/accuracy plot."""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils


def fit(step: Callable, trainable, frozen, opt_state, batches: Iterator, num_steps: int, key, *,
        tokens_per_batch: int | None = None, log_path: str | None = None, eval_fn: Callable | None = None,
        eval_every: int | None = None, log_every: int = 10, progress: bool = True, desc: str = "train",
        max_consecutive_skips: int = 5, diverge_factor: float | None = None, start_step: int = 0,
        checkpoint: Callable | None = None, checkpoint_every: int | None = None,
        should_stop: Callable[[], str | None] | None = None, reference_loss: float | None = None,
        on_record: Callable[[dict], None] | None = None):
    """Runs ``num_steps`` of ``step`` over ``batches``.

    Returns ``(trainable, opt_state, history)`` where ``history`` is the list of records also
    appended (one JSON object a line) to ``log_path``: ``step``, ``loss``, ``grad_norm``,
    ``steps_per_s``, ``tokens_per_s`` (when ``tokens_per_batch`` is given), ``elapsed_s``, plus
    the dict returned by ``eval_fn(trainable)`` every ``eval_every`` steps and at the end, and the
    metrics a step built with ``adapter_update`` names in ``step.log_metrics`` (e.g. AdaLoRA's
    ``adalora_rank`` and ``adalora_budget``; ``opt_state`` is then the step's ``StepState``).
    ``loss_mean`` is the mean loss of the finite steps since the previous record (``loss`` is the
    last batch's alone).

    Non-finite steps: a step from :func:`make_step` skips an update whose loss or gradients are not
    finite (``metrics["skipped"]``); records then carry ``skipped``, the count so far. When
    ``max_consecutive_skips`` steps in a row are skipped, the run is diverging (or the data is
    broken) and ``fit`` raises :class:`FloatingPointError` naming the steps; the parameters it held
    are those of the last good update, so they can still be saved. A step without skipping
    (``skip_nonfinite=False``) that logs a non-finite loss raises at once, as its parameters are lost.
    The skip bookkeeping runs on the device (no host sync per step); it is read when a record is
    logged, so a run stops at most ``log_every`` steps after the limit is reached.

    Divergence: with ``diverge_factor``, a record whose ``loss_mean`` exceeds ``diverge_factor`` times
    the loss at step 1 (the untrained model's) raises :class:`FloatingPointError` too; a run whose
    loss is still finite but ten times where it started has diverged (the CLI uses 10).

    Checkpoints and resuming: ``checkpoint(step, trainable, opt_state, key)`` is called every
    ``checkpoint_every`` steps, after the last step, and when ``should_stop()`` (asked after every
    step) returns a reason (e.g. a SIGTERM, or early stopping); ``key`` is the PRNG key the next step
    would split, so saving it with the step, the parameters and the optimizer state is everything
    a bit-for-bit resume needs. To resume, pass ``start_step`` (the restored step), the restored
    state and key, ``batches`` positioned after ``start_step`` batches, and ``reference_loss`` (the
    step-1 loss, for ``diverge_factor``). A stopped run returns early; its last record has
    ``"stopped"`` (the reason). ``on_record(record)`` sees each record before it is logged (and may add fields).

    Example::

        trainable, opt_state, history = fit(step, trainable, frozen, opt_state, batches, 300,
                                            jax.random.key(0), log_path="runs/x/metrics.jsonl")
    """
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
    if not isinstance(max_consecutive_skips, int) or max_consecutive_skips < 1:
        raise ValueError(f"max_consecutive_skips must be a positive int, got {max_consecutive_skips!r}")
    if not isinstance(log_every, int) or log_every < 1:
        raise ValueError(f"log_every must be a positive int, got {log_every!r}")
    if diverge_factor is not None and not (isinstance(diverge_factor, (int, float)) and diverge_factor > 1):
        raise ValueError(f"diverge_factor must be a number > 1 (or None), got {diverge_factor!r}")
    if not isinstance(start_step, int) or not 0 <= start_step < num_steps:
        raise ValueError(f"start_step must be an int in [0, num_steps={num_steps}), got {start_step!r}")
    if checkpoint_every is not None and (not isinstance(checkpoint_every, int) or checkpoint_every < 1):
        raise ValueError(f"checkpoint_every must be a positive int (or None), got {checkpoint_every!r}")
    main = jax.process_index() == 0   # with many processes, process 0 logs and shows progress
    log = open(log_path, "a") if log_path and main else None
    history = []
    bar = _progress_bar(num_steps, start_step, desc, progress and main)
    should_stop = _agreed(should_stop, log_every) if should_stop is not None and jax.process_count() > 1 else should_stop
    start = last_t = time.perf_counter()
    last_step = start_step
    # device-side counters (no host sync per step): skips so far, the current run of consecutive
    # skips, the longest run and the step it ended at, and the finite-loss sum / count of the window
    acc = _fresh_counters()
    first_loss = reference_loss
    try:
        for i in range(start_step + 1, num_steps + 1):
            try:
                batch = next(batches)
            except StopIteration:
                raise ValueError(f"the batch iterator ran out after {i - 1} of {num_steps} steps") from None
            key, sub = jax.random.split(key)
            trainable, opt_state, metrics = step(trainable, frozen, opt_state, batch, sub)
            skipping = "skipped" in metrics
            acc = _accumulate(acc, metrics["loss"], metrics.get("skipped", 0), i)
            stop = should_stop() if should_stop is not None else None
            do_eval = eval_fn is not None and ((eval_every and i % eval_every == 0) or i == num_steps)
            if i % log_every == 0 or i == num_steps or i == 1 or do_eval or stop:
                loss = float(metrics["loss"])  # synchronises
                skips, _, worst, end, win_sum, win_n = jax.device_get(acc)
                acc = acc[:4] + _fresh_counters()[4:]  # a new loss window
                loss_mean = float(win_sum) / int(win_n) if win_n else math.nan
                if i == 1:
                    first_loss = loss
                if skipping and worst >= max_consecutive_skips:
                    worst, end = int(worst), int(end)
                    raise FloatingPointError(
                        f"{worst} consecutive steps ({end - worst + 1}..{end}) had a non-finite loss or "
                        f"gradients (max_consecutive_skips={max_consecutive_skips}); their updates were "
                        f"skipped, so the parameters are those of step {end - worst}. The run is diverging "
                        f"or the data holds bad examples: lower the learning rate, clip gradients, or check "
                        f"the batches")
                now = time.perf_counter()
                rate = (i - last_step) / max(now - last_t, 1e-9)
                record = {"step": i, "loss": loss, "loss_mean": loss_mean,
                          "grad_norm": float(metrics.get("grad_norm", math.nan)),
                          "steps_per_s": rate, "elapsed_s": now - start}
                if tokens_per_batch:
                    record["tokens_per_s"] = rate * tokens_per_batch
                for k in getattr(step, "log_metrics", ()):
                    if k in metrics:
                        record[k] = float(metrics[k])
                if skipping:
                    record["skipped"] = int(skips)
                elif not math.isfinite(loss):
                    raise FloatingPointError(f"loss became {loss} at step {i}, and this step applies every update "
                                             f"(make_step(skip_nonfinite=False)), so the parameters are lost")
                if (diverge_factor is not None and first_loss is not None and math.isfinite(first_loss)
                        and loss_mean > diverge_factor * abs(first_loss)):
                    raise FloatingPointError(
                        f"the run diverged: mean loss {loss_mean:.4g} over steps {last_step + 1}..{i} is more than "
                        f"diverge_factor={diverge_factor:g} times the loss at step 1 ({first_loss:.4g}); lower the "
                        f"learning rate or clip gradients")
                if do_eval:
                    record.update({f"eval_{k}": float(v) for k, v in eval_fn(trainable).items()})
                    now = time.perf_counter()
                    stop = stop or (should_stop() if should_stop is not None else None)
                if stop:
                    record["stopped"] = str(stop)
                last_t, last_step = now, i
                if on_record is not None:   # may add fields (the CLI's learning rate)
                    on_record(record)
                history.append(record)
                if log:
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                postfix = {"loss": f"{loss:.4f}"}
                if tokens_per_batch:
                    postfix["tok/s"] = f"{record['tokens_per_s']:.0f}"
                bar.set_postfix(postfix)
            bar.update(1)
            if checkpoint is not None and (stop or i == num_steps or (checkpoint_every and i % checkpoint_every == 0)):
                checkpoint(i, trainable, opt_state, key)
            if stop:
                break
    finally:
        bar.close()
        if log:
            log.close()
    return trainable, opt_state, history


def _agreed(should_stop, every: int):
    """``should_stop`` for a run of many processes: asked every ``every`` steps (a host round trip),
    and the first reason any process gives stops all of them at the same step (one that stopped
    alone would leave the others waiting in the next collective)."""
    count = [0]

    def agreed():
        count[0] += 1
        reason = should_stop() if count[0] % every == 0 else None
        if count[0] % every:
            return None
        flags = multihost_utils.process_allgather(np.asarray(reason is not None, np.int32))
        if not np.any(flags):
            return None
        return reason or f"stopped by process {int(np.argmax(np.asarray(flags)))}"

    return agreed


def _fresh_counters():
    z = jnp.zeros((), jnp.int32)
    return (z, z, z, z, jnp.zeros((), jnp.float32), z)


@jax.jit
def _accumulate(acc, loss, skipped, i):
    skips, run, worst, worst_end, win_sum, win_n = acc
    skipped = jnp.asarray(skipped).astype(jnp.int32)
    run = jnp.where(skipped > 0, run + 1, 0)
    longer = run > worst
    finite = jnp.isfinite(loss)
    return (skips + skipped, run, jnp.where(longer, run, worst), jnp.where(longer, i, worst_end),
            win_sum + jnp.where(finite, loss, 0.0).astype(jnp.float32), win_n + finite.astype(jnp.int32))


class _NoBar:
    def set_postfix(self, postfix):
        pass

    def update(self, n):
        pass

    def close(self):
        pass


def _progress_bar(num_steps, start_step, desc, progress):
    """A tqdm bar (tqdm comes with ``jlora[cli]``); without tqdm, no bar (and a warning if one was asked for)."""
    if not progress:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        warnings.warn("fit(progress=True) shows a progress bar only with tqdm installed (pip install 'jlora[cli]' "
                      "or tqdm); training without one", stacklevel=3)
        return _NoBar()
    return tqdm(total=num_steps, initial=start_step, desc=desc, dynamic_ncols=True)


def plot_history(history, path: str, title: str = "") -> str:
    """Saves loss (and any ``eval_*`` metric) against step as a PNG; returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not history:
        raise ValueError("history is empty: nothing to plot")
    counts = ("eval_examples", "eval_response_tokens", "eval_prompts_decoded")  # bookkeeping, not metrics
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
