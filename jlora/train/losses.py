"""Losses the training step and the memory planner share."""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

from jlora.methods.prompt import IGNORE_INDEX, pad_labels

__all__ = ["masked_lm_loss", "chunked_lm_loss", "check_loss_chunk", "IGNORE_INDEX"]


def _targets(length: int, labels):
    """Labels padded for ``length`` positions (``P`` ignored entries in front of a prompt-tuned
    model's virtual tokens, as PEFT does) and shifted: position t's target is ``labels[t + 1]``,
    the last position's is ignored."""
    extra = length - labels.shape[1]
    if extra < 0:
        raise ValueError(f"logits cover {length} positions but labels {labels.shape[1]}")
    labels = pad_labels(labels, extra)
    return jnp.concatenate([labels[:, 1:], jnp.full_like(labels[:, :1], IGNORE_INDEX)], axis=1)


def masked_lm_loss(logits, labels):
    """Mean next-token cross-entropy over positions whose label is not ``IGNORE_INDEX``
    (labels are unshifted: position t predicts ``labels[t + 1]``). Returns (loss, n_tokens).

    Logits longer than the labels come from a model run with ``P`` virtual tokens in front
    (prompt tuning, P-tuning): the labels get ``P`` ignored entries in front, as PEFT does."""
    target = _targets(logits.shape[1], labels)[:, :-1]
    logits = logits[:, :-1].astype(jnp.float32)
    valid = target != IGNORE_INDEX
    logp = jax.nn.log_softmax(logits, -1)
    picked = jnp.take_along_axis(logp, jnp.where(valid, target, 0)[..., None], -1)[..., 0]
    n = jnp.maximum(valid.sum(), 1)
    return -(picked * valid).sum() / n, valid.sum()


def check_loss_chunk(chunk) -> int | None:
    """``None`` / 0 (no chunking) or a positive number of sequence positions per chunk."""
    if chunk is None or (isinstance(chunk, int) and not isinstance(chunk, bool) and chunk == 0):
        return None
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 0:
        raise ValueError(f"loss_chunk must be a positive number of sequence positions (or 0 / None for the "
                         f"whole sequence at once), got {chunk!r}")
    return chunk


def chunked_lm_loss(hidden, logits_fn: Callable, labels, chunk: int | None):
    """:func:`masked_lm_loss` of ``logits_fn(hidden)`` without the whole ``(batch, T, vocab)``
    float32 logits ever existing: the sequence is cut into chunks of ``chunk`` positions, each
    chunk's logits are formed, reduced to its summed cross-entropy and dropped, and recomputed
    in the backward pass (``jax.checkpoint``), so the loss's working set is
    ``batch * chunk * vocab`` floats instead of ``batch * T * vocab``.

    ``hidden`` (B, T, d) is the model's last hidden state, ``logits_fn`` a pure function of a
    ``(B, chunk, d)`` slice to its ``(B, chunk, vocab)`` logits (the head's weights closed over),
    ``labels`` (B, T or T - P) unshifted as for :func:`masked_lm_loss`. ``chunk=None`` (or a chunk
    no shorter than the sequence) forms the logits once. Returns (loss, n_tokens)."""
    chunk = check_loss_chunk(chunk)
    B, T = hidden.shape[:2]
    target = _targets(T, labels)
    valid = target != IGNORE_INDEX
    count = valid.sum()

    def part(h, t):
        logits = logits_fn(h).astype(jnp.float32)
        ok = t != IGNORE_INDEX
        picked = jnp.take_along_axis(logits, jnp.where(ok, t, 0)[..., None], -1)[..., 0]
        return jnp.sum(jnp.where(ok, jax.nn.logsumexp(logits, -1) - picked, 0.0))

    if chunk is None or chunk >= T:
        total = part(hidden, target)
    else:
        n = math.ceil(T / chunk)
        pad = n * chunk - T
        if pad:   # the tail chunk is filled with ignored positions
            hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
            target = jnp.pad(target, ((0, 0), (0, pad)), constant_values=IGNORE_INDEX)
        hs = jnp.moveaxis(hidden.reshape(B, n, chunk, *hidden.shape[2:]), 1, 0)
        ts = jnp.moveaxis(target.reshape(B, n, chunk), 1, 0)
        step = jax.checkpoint(part)   # the chunk's logits are recomputed, never saved

        def body(acc, xs):
            return acc + step(*xs), None

        total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (hs, ts))
    return total / jnp.maximum(count, 1), count
