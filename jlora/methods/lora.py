"""LoRA (Hu et al. 2021) with rsLoRA scaling and PiSSA / OLoRA initialisation.

``delta W = scale * A @ B`` with ``A: inputs x r`` and ``B: r x outputs`` (Flax layout);
``scale = alpha / r`` or ``alpha / sqrt(r)`` with ``rslora=True``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from jlora.core.nodes import AdapterMeta, Layout
from jlora.core.spec import AdapterSpec
from jlora.core.state import LoRAState

INITS = ("kaiming", "gaussian", "pissa", "olora", "zeros_b_normal")


def _pattern_value(patterns, path: str, default):
    """PEFT's ``rank_pattern`` / ``alpha_pattern`` lookup: key matches ``(.*/)?key`` at the end
    of the module path (the path without its final leaf name) or of the full path."""
    if not patterns:
        return default
    module = path.rsplit("/", 1)[0] if "/" in path else path
    for key, value in patterns:
        regex = rf"(.*/)?({key})"
        if re.fullmatch(regex, module) or re.fullmatch(regex, path):
            return value
    return default


@dataclasses.dataclass(frozen=True)
class LoRA(AdapterSpec):
    """Low-rank adaptation spec.

    Example::

        spec = jlora.LoRA(rank=8, alpha=16, targets=r".*/(query|value)/kernel")
        adapted = jlora.apply(params, spec, key=jax.random.key(0))

    Args:
      rank: adapter rank r (> 0).
      alpha: scale numerator; ``scale = alpha / r`` (``alpha / sqrt(r)`` with ``rslora``).
      targets: regex (full match on ``a/b/kernel`` paths) or list of names/regexes.
      exclude: patterns that are never adapted (wins over ``targets``).
      dropout: dropout probability on the adapter's input (needs ``jlora_rng=`` at call time).
      rslora: rank-stabilised scaling.
      init: "kaiming" (PEFT default: A ~ U(+-1/sqrt(fan_in)), B = 0), "gaussian"
        (A ~ N(0, 1/r^2), B = 0), "pissa" (top-r singular vectors, base = residual),
        "olora" (QR of the weight, base = residual).
      rank_pattern / alpha_pattern: ``{pattern: value}`` overrides per path (PEFT semantics).
      train_also: patterns of leaves trained in full (PEFT's ``modules_to_save``).
      axes: ``{pattern: jlora.Axes(stack=, inputs=)}`` hints for N-D kernels.
      dtype: dtype of the factors (default float32, whatever the base dtype).
    """

    rank: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    rslora: bool = False
    init: str = "kaiming"
    rank_pattern: Mapping[str, int] | None = None
    alpha_pattern: Mapping[str, float] | None = None
    dtype: Any = jnp.float32

    method = "lora"

    def __post_init__(self):
        self._validate_common()
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise ValueError(f"LoRA rank must be a positive int, got {self.rank!r}")
        if not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool) or not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ValueError(f"LoRA alpha must be a positive finite number, got {self.alpha!r}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        if self.init not in INITS:
            raise ValueError(f"LoRA init must be one of {INITS}, got {self.init!r}")
        for name in ("rank_pattern", "alpha_pattern"):
            value = getattr(self, name)
            if value is None:
                object.__setattr__(self, name, ())
                continue
            if not isinstance(value, Mapping):
                raise TypeError(f"{name} must be a mapping of pattern -> value, got {value!r}")
            for k, v in value.items():
                bad = (name == "rank_pattern" and (not isinstance(v, int) or v < 1)) or \
                      (name == "alpha_pattern" and (not isinstance(v, (int, float)) or v <= 0))
                if bad:
                    raise ValueError(f"{name}[{k!r}] must be a positive {'int' if name == 'rank_pattern' else 'number'}, got {v!r}")
            object.__setattr__(self, name, tuple(value.items()))
        try:
            jnp.dtype(self.dtype)
        except TypeError:
            raise TypeError(f"LoRA dtype must be a floating dtype, got {self.dtype!r}") from None

    # -- per-leaf hyper-parameters -------------------------------------------------------
    def rank_for(self, path: str) -> int:
        return _pattern_value(self.rank_pattern, path, self.rank)

    def alpha_for(self, path: str) -> float:
        return float(_pattern_value(self.alpha_pattern, path, self.alpha))

    def scale_for(self, path: str) -> float:
        r, alpha = self.rank_for(path), self.alpha_for(path)
        return alpha / math.sqrt(r) if self.rslora else alpha / r

    # -- node construction -----------------------------------------------------------------
    def init_state(self, key, base, layout: Layout, path: str, embedding: bool = False):
        """``(LoRAState(a, b), new_base, meta)`` for one leaf."""
        a, b, new_base, meta = self.init_factors(key, base, layout, path, embedding=embedding)
        return LoRAState(a, b), new_base, meta

    def init_factors(self, key, base, layout: Layout, path: str, embedding: bool = False):
        """Returns ``(a, b, new_base, AdapterMeta)`` for one leaf."""
        rank = self.rank_for(path)
        scale = self.scale_for(path)
        stack, inputs, outputs = layout.split(base.shape)
        n_in, n_out = math.prod(inputs), math.prod(outputs)
        if rank > min(n_in, n_out):
            raise ValueError(
                f"rank {rank} for {path!r} exceeds min(inputs={n_in}, outputs={n_out}) of kernel {tuple(base.shape)}")
        dtype = jnp.dtype(self.dtype)
        a_shape, b_shape = stack + inputs + (rank,), stack + (rank,) + outputs
        new_base = base
        init = self.init
        ka, kb = jax.random.split(key)
        if embedding and init in ("kaiming", "gaussian"):
            init = "zeros_b_normal"  # PEFT's embedding LoRA: A = 0, B ~ N(0, 1)
        if init == "kaiming":
            bound = 1.0 / math.sqrt(n_in)
            a = jax.random.uniform(ka, a_shape, dtype, -bound, bound)
            b = jnp.zeros(b_shape, dtype)
        elif init == "gaussian":
            a = jax.random.normal(ka, a_shape, dtype) / rank
            b = jnp.zeros(b_shape, dtype)
        elif init == "zeros_b_normal":
            a = jnp.zeros(a_shape, dtype)
            b = jax.random.normal(kb, b_shape, dtype)
        else:
            a, b, new_base = _svd_or_qr_init(init, base, layout, rank, scale, dtype)
        meta = AdapterMeta(method=self.method, rank=rank, scale=scale, dropout=float(self.dropout), init=init)
        return a, b, new_base, meta


def _svd_or_qr_init(init, base, layout: Layout, rank: int, scale: float, dtype):
    stack, inputs, outputs = layout.split(base.shape)
    n_in, n_out = math.prod(inputs), math.prod(outputs)
    w = base.astype(jnp.float32).reshape(stack + (n_in, n_out))
    if init == "pissa":
        # PEFT pissa_init on W_pt = K^T: A = sqrt(S_r/s) Vh_r-side, B = ..., base = W - s*A@B.
        u, s_vals, vh = jnp.linalg.svd(w, full_matrices=False)
        root = jnp.sqrt(s_vals[..., :rank] / scale)
        a = u[..., :, :rank] * root[..., None, :]
        b = root[..., :, None] * vh[..., :rank, :]
    elif init == "olora":
        # PEFT olora_init: Q, R = qr(W_pt); A_pt = R[:r], B_pt = Q[:, :r]; base = W - s*B_pt@A_pt.
        q, r = jnp.linalg.qr(jnp.swapaxes(w, -1, -2))  # W_pt: (out, in)
        a = jnp.swapaxes(r[..., :rank, :], -1, -2)       # (in, r)
        b = jnp.swapaxes(q[..., :, :rank], -1, -2)       # (r, out)
    else:  # pragma: no cover - guarded by validation
        raise ValueError(init)
    residual = w - scale * (a @ b)
    new_base = residual.reshape(base.shape).astype(base.dtype)
    a = a.reshape(stack + inputs + (rank,)).astype(dtype)
    b = b.reshape(stack + (rank,) + outputs).astype(dtype)
    return a, b, new_base
