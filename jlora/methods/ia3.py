"""IA3 (Liu et al. 2022, "(IA)^3"): learned vectors that rescale activations.

For a targeted kernel ``W0`` (Flax layout ``inputs x outputs``) a vector ``l`` initialised to ones
scales the layer's output, ``y = (x W0) * l`` (attention keys and values), or, for feed-forward
layers, its input, ``y = (x * l) W0`` (the MLP down projection). Merging gives ``W0 * l`` along the
outputs (columns of a Flax kernel) or the inputs (rows); unmerging divides. Only the vectors train.

Difference from PEFT: PEFT's non-feed-forward IA3 multiplies ``base(x)`` *including the bias*
(and scales the bias on merge). jlora's adapter lives on the kernel, so a bias that the model adds
after the matmul is not scaled. The Llama family has no biases on k/v/down; on BERT's key/value
(which have biases) the two differ by ``b * (l - 1)``.

Example::

    spec = jlora.IA3(targets=r".*/(k_proj|v_proj|down_proj)/kernel", feedforward=r".*/down_proj/kernel")
    adapted = jlora.apply(params, spec)
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from jlora.core.nodes import AdapterMeta, Layout
from jlora.core.paths import matches, normalize_patterns
from jlora.core.spec import AdapterSpec
from jlora.core.state import AdapterState, Gain, register_state_type

#: PEFT's per-architecture IA3 defaults (targets, feed-forward) for jlora's models.
DEFAULTS = {
    "llama": (r".*/(k_proj|v_proj|down_proj)/kernel", r".*/down_proj/kernel"),
    # PEFT's bert entry: ["key", "value", "output.dense"], feed-forward ["output.dense"] (its suffix
    # match takes attention/output/dense as well as the MLP's output/dense)
    "bert": (r".*/(key|value|output/dense)/kernel", r".*/output/dense/kernel"),
}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class IA3State(AdapterState):
    """IA3's state: the vector ``l`` (stack + outputs, or stack + inputs when the adapter's
    ``AdapterMeta.feedforward`` is set). No low-rank term; ``W = W0 * l``."""

    l: Any = None

    exclusive: ClassVar[bool] = True
    title: ClassVar[str] = "IA3"

    def gain(self, meta, layout, w0) -> Gain:
        return Gain(inputs=self.l) if meta.feedforward else Gain(outputs=self.l)


register_state_type("ia3", IA3State)


@dataclasses.dataclass(frozen=True)
class IA3(AdapterSpec):
    """IA3 spec.

    Args:
      targets: patterns of the kernels to rescale (as in :class:`jlora.LoRA`).
      feedforward: patterns (a subset of ``targets``) whose *inputs* are scaled; every other
        target has its outputs scaled. None: no feed-forward layers.
      exclude, train_also, axes: as in :class:`jlora.LoRA`.
      dtype: dtype of the vectors (default float32).
    """

    feedforward: Any = None
    dtype: Any = jnp.float32

    method = "ia3"

    def __post_init__(self):
        self._validate_common()
        object.__setattr__(self, "feedforward", normalize_patterns(self.feedforward, "feedforward"))
        try:
            dt = jnp.dtype(self.dtype)
        except TypeError:
            raise TypeError(f"IA3 dtype must be a floating dtype, got {self.dtype!r}") from None
        if not jnp.issubdtype(dt, jnp.floating):
            raise TypeError(f"IA3 dtype must be a floating dtype, got {self.dtype!r}")

    def is_feedforward(self, path: str) -> bool:
        return bool(self.feedforward) and matches(path, self.feedforward)

    def init_state(self, key, base, layout: Layout, path: str, embedding: bool = False):
        """``(IA3State(ones), base, meta)``: the vector starts at one (a no-op)."""
        if embedding:
            raise ValueError(f"IA3 scales linear layers; {path!r} is an embedding table (narrow the targets)")
        meta = AdapterMeta(method="ia3", rank=0, scale=1.0, dropout=0.0, init="ones",
                           feedforward=self.is_feedforward(path))
        stack, inputs, outputs = layout.split(tuple(base.shape))
        shape = stack + (inputs if meta.feedforward else outputs)
        return IA3State(jnp.ones(shape, jnp.dtype(self.dtype))), base, meta
