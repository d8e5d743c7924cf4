"""Typed adapter state: the arrays one named adapter keeps on one kernel, and what they do to it.

Every method's per-kernel state is a registered pytree dataclass deriving from
:class:`AdapterState`. The adapted-weight node (:class:`jlora.core.nodes.AdaptedWeight`) holds one
per adapter name; ``jlora.lift``, ``merge``, ``partition`` and the savers ask the state, never the
method's name. A state answers four questions:

* ``factors(layout)``: its low-rank term ``s * (x a) b`` as ``(a, b)`` (``a: stack + inputs + (r,)``,
  ``b: stack + (r,) + outputs``), or None when it has none (IA3);
* ``gain(meta, layout, w0)``: what it does to ``W0`` itself (:class:`Gain`), or None;
* ``transposed(layout)`` / ``scaled(c)``: the same adapter on ``W0^T`` / ``c * W0`` if it can be
  expressed (lets ``lift`` follow a tied embedding's transpose or a scalar multiple), else None;
* class-level facts: which fields are ``frozen`` (derived, never trained), whether it ``needs_base``
  to compute its gain, whether it is ``exclusive`` on a kernel and whether its delta is ``additive``
  (``s * a @ b``, so ``combine_adapters`` may mix it).

A method registers its state class under the method names its specs produce
(:func:`register_state_type`), which is how a checkpoint or a PEFT file is turned back into state.

With several active adapters on one kernel the adapted op is::

    out = ((x * in) W0) * out * (1 + sum shift) + sum_k term_k * s_k (x a_k) b_k

where ``in`` / ``out`` multiply over the adapters that scale inputs / outputs, ``shift`` sums over
those that shift W0's gain (DoRA: ``g - 1``) and ``term_k`` is 1 unless the adapter scales its own
term (DoRA: ``g``).

Example:

>>> import jax.numpy as jnp
>>> from jlora.core.nodes import Layout
>>> from jlora.core.state import LoRAState
>>> state, layout = LoRAState(a=jnp.ones((4, 2)), b=jnp.zeros((2, 3))), Layout(0, 1, 1)
>>> [x.shape for x in state.factors(layout)], state.scales_base, state.trainable_fields()
([(4, 2), (2, 3)], False, ('a', 'b'))
>>> [x.shape for x in state.transposed(layout).factors(layout.transposed())]   # on W0^T: (3, 4)
[(3, 2), (2, 4)]
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

Array = Any


@dataclasses.dataclass(frozen=True)
class Gain:
    """What an adapter does to ``W0`` besides adding a low-rank term (each entry optional).

    ``outputs``: multiplies W0 along its output axes (``stack + outputs``; IA3).
    ``inputs``: multiplies the input before ``W0`` (``stack + inputs``; IA3 feed-forward).
    ``shift``: adds ``shift * W0`` along the output axes (``stack + outputs``; DoRA's ``g - 1``).
    ``term``: multiplies this adapter's own low-rank term (``stack + outputs``; DoRA's ``g``).
    """

    outputs: Array = None
    inputs: Array = None
    shift: Array = None
    term: Array = None


class AdapterState:
    """Base class of every per-kernel adapter state (subclasses are frozen registered dataclasses).

    Subclasses set the class attributes below and override :meth:`factors` / :meth:`gain` /
    :meth:`transposed` / :meth:`scaled` where they apply.
    """

    #: fields that are derived and never trained: ``partition`` puts them in the frozen half
    frozen: ClassVar[tuple] = ()
    #: ``gain`` reads the dense base ``w0`` (otherwise it is passed None and W0 is not dequantised)
    needs_base: ClassVar[bool] = False
    #: cannot share a kernel with adapters of another state type (IA3 rescales W0 itself)
    exclusive: ClassVar[bool] = False
    #: the delta is exactly ``s * a @ b`` (``combine_adapters`` may mix it with others)
    additive: ClassVar[bool] = False
    #: the method's name in messages
    title: ClassVar[str] = "adapter"

    # -- the protocol --------------------------------------------------------------------
    def factors(self, layout):
        """``(a, b)`` of the low-rank term, or None when this adapter has none."""
        return None

    def gain(self, meta, layout, w0) -> Gain | None:
        """What this adapter does to W0 (``w0`` is the dense base when ``needs_base``, else None)."""
        return None

    def transposed(self, layout):
        """This adapter on the transposed kernel (inputs and outputs swapped), or None."""
        return None

    def scaled(self, c):
        """This adapter on ``c * W0`` (``c`` a scalar), or None."""
        return None

    @classmethod
    def before_save(cls, tree, spec):
        """``(tree, spec)`` as ``jlora.io.save_adapter`` should write them, called once per state type
        present in ``tree`` (AdaLoRA drops its masked triplets and records the kept ranks in the
        spec). Default: unchanged."""
        return tree, spec

    @property
    def scales_base(self) -> bool:
        """True when :meth:`gain` can return something (the adapted op is not ``x W0 + terms``)."""
        return type(self).gain is not AdapterState.gain

    # -- generic helpers -----------------------------------------------------------------
    def arrays(self) -> dict:
        """``{field: value}`` of every array field (None where absent)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if not f.metadata.get("static", False)}

    def trainable_fields(self) -> tuple:
        return tuple(k for k in self.arrays() if k not in self.frozen)

    def replace(self, **changes) -> "AdapterState":
        return dataclasses.replace(self, **changes)

    def split(self, trainable: bool) -> "AdapterState":
        """The trainable half (frozen fields None) or the frozen half (trainable fields None)."""
        return self.replace(**{k: None for k in self.arrays() if (k in self.frozen) == trainable})

    def missing(self) -> tuple:
        """Array fields that hold no value (a half from :meth:`split`)."""
        return tuple(k for k, v in self.arrays().items() if v is None)

    @classmethod
    def empty(cls) -> "AdapterState":
        """An instance with every array field None (filled in by the legacy constructors)."""
        return cls(**{f.name: None for f in dataclasses.fields(cls) if not f.metadata.get("static", False)})


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoRAState(AdapterState):
    """Plain low-rank factors: ``delta W = s * a @ b`` (LoRA, QLoRA, rsLoRA, PiSSA/OLoRA inits,
    combined adapters, and tCURLoRA's factors once expanded from its shared cores)."""

    a: Array = None
    b: Array = None

    additive: ClassVar[bool] = True
    title: ClassVar[str] = "LoRA"

    def factors(self, layout):
        if self.a is None or self.b is None:
            return None
        return self.a, self.b

    def transposed(self, layout):
        if self.a is None or self.b is None:
            return None
        s = layout.stack   # S+I+r, S+r+O  ->  S+O+r, S+r+I
        return self.replace(a=jnp.moveaxis(self.b, s, -1), b=jnp.moveaxis(self.a, -1, s))

    def scaled(self, c):
        if self.b is None:
            return None
        return self.replace(b=self.b * (c.astype(self.b.dtype) if hasattr(c, "astype") else c))


_STATE_TYPES: dict = {}
_BASE_REWRITING_INITS: set = set()


def register_base_rewriting_init(*inits: str) -> None:
    """Declares initialisations (``AdapterMeta.init``) that rewrite the base weight, e.g. LoRA's PiSSA
    and OLoRA (the base becomes a residual): savers then keep the base, and PEFT files refuse them."""
    _BASE_REWRITING_INITS.update(inits)


def rewrites_base(meta) -> bool:
    """True when this adapter's initialisation rewrote its node's base (see
    :func:`register_base_rewriting_init`)."""
    return meta.init in _BASE_REWRITING_INITS


def register_state_type(method: str, cls) -> None:
    """Declares that adapters whose ``AdapterMeta.method`` is ``method`` keep a ``cls`` state."""
    if not (isinstance(cls, type) and issubclass(cls, AdapterState)):
        raise TypeError(f"state type for {method!r} must subclass jlora.core.state.AdapterState, got {cls!r}")
    _STATE_TYPES[method] = cls


def state_type(method: str):
    """The state class registered for ``method``."""
    try:
        return _STATE_TYPES[method]
    except KeyError:
        raise ValueError(f"no adapter state type is registered for method {method!r}; known: "
                         f"{sorted(_STATE_TYPES)} (is the method's module imported?)") from None


register_state_type("lora", LoRAState)
