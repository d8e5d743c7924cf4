"""Losses the training step and the memory planner share."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jlora.methods.prompt import IGNORE_INDEX, pad_labels

__all__ = ["masked_lm_loss", "IGNORE_INDEX"]


def masked_lm_loss(logits, labels):
    """Mean next-token cross-entropy over positions whose label is not ``IGNORE_INDEX``
    (labels are unshifted: position t predicts ``labels[t + 1]``). Returns (loss, n_tokens).

    Logits longer than the labels come from a model run with ``P`` virtual tokens in front
    (prompt tuning, P-tuning): the labels get ``P`` ignored entries in front, as PEFT does."""
    extra = logits.shape[1] - labels.shape[1]
    if extra < 0:
        raise ValueError(f"logits cover {logits.shape[1]} positions but labels {labels.shape[1]}")
    labels = pad_labels(labels, extra)
    logits = logits[:, :-1].astype(jnp.float32)
    target = labels[:, 1:]
    valid = target != IGNORE_INDEX
    logp = jax.nn.log_softmax(logits, -1)
    picked = jnp.take_along_axis(logp, jnp.where(valid, target, 0)[..., None], -1)[..., 0]
    n = jnp.maximum(valid.sum(), 1)
    return -(picked * valid).sum() / n, valid.sum()
