"""Adapted weights: registered pytree dataclasses that replace a matched parameter leaf.

An :class:`AdaptedWeight` sits where the original kernel was. It holds the frozen ``base`` (the
original array, or a quantised one) and, per named adapter, that method's typed state
(:mod:`jlora.core.state`: ``LoRAState(a, b)``, ``DoRAState``, ``IA3State``, ``SVDState``, ...).
Everything that is not an array (rank, scale, which adapters are active, how the kernel's axes
split into stacked / input / output groups) is static pytree aux data.

Factor layout, for a base of shape ``stack + inputs + outputs``::

    a: stack + inputs + (rank,)
    b: stack + (rank,) + outputs
    delta = scale * a @ b          (contracting the rank axis, batched over stack)

The node never asks which method an adapter is: each state says what it contributes (its
low-rank factors and its :class:`jlora.core.state.Gain` on W0), and the node combines them as
``W = (W0 * in) * out * (1 + sum shift) + sum_k term_k * s_k a_k b_k``. Each method's module
states its own maths (``jlora.methods.dora``, ``.ia3``, ``.adalora``, ...).

This is the Flax (in, out) convention; PyTorch/PEFT's ``lora_A`` (r, in) and ``lora_B``
(out, r) are the transposes of ``a`` and ``b`` for a 2-D kernel.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from jax import lax

from jlora.core.state import state_type
from jlora.quant.core import QuantizedArray, dequantize

Array = Any


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a kernel's axes split: ``stack`` leading stacked-layer axes, then ``inputs``
    contracted axes, then ``outputs`` axes (``stack + inputs + outputs == ndim``)."""

    stack: int
    inputs: int
    outputs: int

    def __post_init__(self):
        for name in ("stack", "inputs", "outputs"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"Layout.{name} must be a non-negative int, got {value!r}")
        if self.inputs < 1 or self.outputs < 1:
            raise ValueError(
                f"Layout needs at least one input and one output axis, got {self}")

    @property
    def ndim(self) -> int:
        return self.stack + self.inputs + self.outputs

    def split(self, shape):
        """Returns (stack_shape, input_shape, output_shape) of ``shape``."""
        if len(shape) != self.ndim:
            raise ValueError(f"shape {tuple(shape)} has {len(shape)} axes, layout {self} expects {self.ndim}")
        s, i = self.stack, self.stack + self.inputs
        return tuple(shape[:s]), tuple(shape[s:i]), tuple(shape[i:])

    def unstacked(self, n: int = 1) -> "Layout":
        if n > self.stack:
            raise ValueError(f"cannot remove {n} stacked axes from {self}")
        return Layout(self.stack - n, self.inputs, self.outputs)

    def transposed(self) -> "Layout":
        return Layout(self.stack, self.outputs, self.inputs)


@dataclasses.dataclass(frozen=True)
class AdapterMeta:
    """Static description of one named adapter on one leaf (``rank`` 0 for IA3;
    ``feedforward`` only for IA3: scale the inputs instead of the outputs).

    ``group`` / ``slices``: for methods whose factors are derived from parameters shared by several
    leaves (tCURLoRA: one trainable core per stacked tensor), the name of the shared group under
    the tree's reserved top-level entry and this leaf's slice index (one per stacked layer of the
    kernel, in row-major order). Such a node has no ``a`` / ``b`` of its own until
    :func:`jlora.core.api.expand` fills them in."""

    method: str
    rank: int
    scale: float
    dropout: float = 0.0
    init: str = "kaiming"
    feedforward: bool = False
    group: str = ""
    slices: tuple = ()

    def __post_init__(self):  # JSON gives a list; static metadata must be hashable
        object.__setattr__(self, "slices", tuple(int(k) for k in self.slices))


_LEGACY = ("a", "b", "extra", "cache")


@dataclasses.dataclass(frozen=True)
class AdaptedWeight:
    """A kernel with one or more named adapters.

    ``base`` is the frozen weight (a dense array or a :class:`jlora.quant.QuantizedArray`);
    ``states[name]`` is that adapter's typed state (:class:`jlora.core.state.AdapterState`:
    ``LoRAState(a, b)``, ``DoRAState(a, b, m, w0_sq)``, ``IA3State(l)``, ``SVDState(a, e, b)``, ...).
    ``adapters`` is a tuple of ``(name, AdapterMeta)`` pairs and ``active`` the names that run and
    train (both static, hashable).
    """

    base: Array
    states: dict
    layout: Layout = dataclasses.field(metadata=dict(static=True))
    adapters: tuple = dataclasses.field(metadata=dict(static=True))
    active: tuple = dataclasses.field(metadata=dict(static=True))
    path: str = dataclasses.field(default="", metadata=dict(static=True))

    # -- static helpers ---------------------------------------------------------------
    @property
    def meta(self) -> Mapping[str, AdapterMeta]:
        return dict(self.adapters)

    @property
    def shape(self):
        return tuple(self.base.shape)

    @property
    def dtype(self):
        return jnp.dtype(self.base.dtype)

    @property
    def quantized(self) -> bool:
        return is_quantized(self.base)

    @property
    def names(self) -> tuple:
        """Every adapter name on this node, active or not, in the order they were added."""
        return tuple(n for n, _ in self.adapters)

    @property
    def scales_base(self) -> bool:
        """True when an active adapter acts on W0 itself (a :class:`Gain`), so the adapted op is not
        just ``x W0 + sum s (x A) B``."""
        return any(self.states[n].scales_base for n in self.active)

    @property
    def needs_base(self) -> bool:
        """True when an active adapter's gain reads the dense base (DoRA's norm)."""
        return any(self.states[n].needs_base for n in self.active)

    def factors(self, name):
        """``(a, b)`` of adapter ``name``'s low-rank term (AdaLoRA's singular values folded into ``a``)."""
        state = self.states[name]
        found = state.factors(self.layout)
        if found is None:
            meta = self.meta[name]
            if meta.group:
                raise ValueError(
                    f"adapter {name!r} ({meta.method}) on {self.path!r} has no factors of its own: they are derived "
                    f"from the shared group {meta.group!r}. Pass the whole adapted tree (with its reserved top-level "
                    f"entry, e.g. 'jlora_tcur') to jlora.lift / merge, or expand it first with jlora.core.api.expand")
            raise ValueError(f"adapter {name!r} ({meta.method}) on {self.path!r} has no low-rank factors"
                             f"{' (this half of jlora.partition holds none)' if state.missing() else ''}")
        return found

    def active_factors(self):
        """Yields ``(name, a, b, meta)`` for every active adapter with a low-rank term."""
        meta = self.meta
        for name in self.active:
            if _has_term(self.states[name]):
                a, b = self.factors(name)
                yield name, a, b, meta[name]

    def gains(self, w0=None, dtype=jnp.float32):
        """``(out_gain, in_gain, term_gains)``: the factors on W0 along the output axes (stack +
        outputs) and the input axes (stack + inputs), or None where there are none, and
        ``{name: gain}`` on the low-rank terms of the adapters that scale their own term.

        ``w0`` (the dense base) is computed here when an active adapter needs it and none is given."""
        meta = self.meta
        out_gain = in_gain = shift = None
        terms = {}
        for name in self.active:
            state = self.states[name]
            if not state.scales_base:
                continue
            if state.needs_base and w0 is None:
                w0 = dense(self.base, jnp.float32)
            g = state.gain(meta[name], self.layout, w0 if state.needs_base else None)
            if g is None:
                continue
            if g.outputs is not None:
                v = g.outputs.astype(dtype)
                out_gain = v if out_gain is None else out_gain * v
            if g.inputs is not None:
                v = g.inputs.astype(dtype)
                in_gain = v if in_gain is None else in_gain * v
            if g.shift is not None:
                v = g.shift.astype(dtype)
                shift = v if shift is None else shift + v
            if g.term is not None:
                terms[name] = g.term.astype(dtype)
        if shift is not None:  # W0 * (1 + sum shift)
            out_gain = (1 + shift) if out_gain is None else out_gain * (1 + shift)
        return out_gain, in_gain, terms

    # -- math ----------------------------------------------------------------------------
    def _affine(self, w0, dtype):
        """``(gain_on_w0, additive)`` with ``W = W0 * gain + additive`` (broadcast shapes)."""
        lay = self.layout
        out_gain, in_gain, terms = self.gains(w0, dtype)
        gain = jnp.ones((), dtype)
        if out_gain is not None:
            gain = gain * _on_outputs(out_gain, lay)
        if in_gain is not None:
            gain = gain * _on_inputs(in_gain, lay)
        add = jnp.zeros(self.shape, dtype)
        for name, a, b, meta in self.active_factors():
            d = factor_product(a, b, lay).astype(dtype) * jnp.asarray(meta.scale, dtype)
            if name in terms:
                d = d * _on_outputs(terms[name], lay)
            add = add + d
        return gain, add

    def delta(self, names=None, dtype=None) -> Array:
        """The dense update ``W_adapted - W0`` with the base's shape (materialises)."""
        node = self if names is None else self.with_(active=tuple(names))
        dtype = dtype or jnp.promote_types(self.dtype, jnp.float32)
        w0 = dense(self.base, dtype)
        gain, add = node._affine(w0, dtype)
        return w0 * (gain - 1) + add

    def materialize(self, dtype=None) -> Array:
        """``W0`` with the active adapters applied, in ``dtype`` (default: the base's dtype)."""
        dtype = dtype or self.dtype
        if not self.active:
            return dense(self.base, dtype)
        work = jnp.promote_types(self.dtype, jnp.float32)
        w0 = dense(self.base, work)
        gain, add = self._affine(w0, work)
        return (w0 * gain + add).astype(dtype)

    def unapply(self, merged, dtype=None):
        """The base that :meth:`materialize` turns into ``merged``: ``(W - additive) / gain``
        (DoRA's gain comes from this node's own base and factors, as PEFT's cached norm does)."""
        work = jnp.promote_types(self.dtype, jnp.float32)
        gain, add = self._affine(dense(self.base, work), work)
        return ((jnp.asarray(merged).astype(work) - add) / gain).astype(dtype or self.dtype)

    # -- adapters ------------------------------------------------------------------------
    def add_adapter(self, name: str, state, meta: AdapterMeta, active: bool = True) -> "AdaptedWeight":
        """This node with one more named adapter (refusing a duplicate name or an exclusive mix)."""
        if name in self.states:
            raise ValueError(f"{self.path!r} already has an adapter named {name!r}; pass another name=")
        clash = [type(s) for s in self.states.values() if type(s) is not type(state) and (s.exclusive or state.exclusive)]
        if clash:
            exclusive = type(state) if state.exclusive else clash[0]
            raise ValueError(
                f"{self.path!r} already carries {sorted(m.method for _, m in self.adapters)} adapters; "
                f"{exclusive.title} cannot be combined with adapters of another kind on the same kernel "
                f"(got a new {meta.method!r} adapter)")
        return dataclasses.replace(self, states={**self.states, name: state},
                                   adapters=self.adapters + ((name, meta),),
                                   active=self.active + ((name,) if active else ()))

    def remove_adapter(self, name: str):
        """This node without adapter ``name``: the plain base when it was the last one, or, for a
        quantised base (which only jlora.lift / merge can run), a node with no adapter."""
        if name not in self.states:
            raise ValueError(f"{self.path!r} has no adapter named {name!r}; it has {list(self.names)}")
        if self.names == (name,) and not self.quantized:
            return self.base
        return dataclasses.replace(self, states={k: v for k, v in self.states.items() if k != name},
                                   adapters=tuple(p for p in self.adapters if p[0] != name),
                                   active=tuple(n for n in self.active if n != name))

    def split(self, trainable: bool) -> "AdaptedWeight":
        """One half of :func:`jlora.partition`: the active adapters' trainable arrays (base None),
        or the base, the inactive adapters and every frozen array."""
        active = set(self.active)
        states = {}
        for n, s in self.states.items():
            if trainable:
                states[n] = s.split(True) if n in active else s.replace(**{k: None for k in s.arrays()})
            else:
                states[n] = s.split(False) if n in active else s
        return dataclasses.replace(self, base=None if trainable else self.base, states=states)

    def with_(self, **changes) -> "AdaptedWeight":
        """``dataclasses.replace``; also takes the pre-0.2 dict fields ``a`` / ``b`` / ``extra`` /
        ``cache`` (``{name: array}``, ``{name: {field: array}}``) for one release."""
        legacy = {k: changes.pop(k) for k in _LEGACY if k in changes}
        node = dataclasses.replace(self, **changes) if changes else self
        if legacy:
            node = dataclasses.replace(node, states=_states_from_parts(node.adapters, node.states, **legacy))
        return node

    @classmethod
    def from_parts(cls, base, layout, adapters, active, path="", *, a=None, b=None, extra=None, cache=None):
        """A node from per-field dicts (``a={name: A}``, ``extra={name: {"m": m}}``, ...), each adapter's
        state type chosen by its ``AdapterMeta.method`` (see :func:`jlora.core.state.register_state_type`)."""
        states = _states_from_parts(tuple(adapters), {}, a=a or {}, b=b or {}, extra=extra or {}, cache=cache or {})
        return cls(base=base, states=states, layout=layout, adapters=tuple(adapters), active=tuple(active), path=path)

    # -- pre-0.2 read-only views (the same grouping the pytree key paths use) -------------------
    @property
    def a(self) -> dict:
        return _grouped(self)["a"]

    @property
    def b(self) -> dict:
        return _grouped(self)["b"]

    @property
    def extra(self) -> dict:
        return _grouped(self)["extra"]

    @property
    def cache(self) -> dict:
        return _grouped(self)["cache"]


#: the pre-0.2 name (one release)
LoRANode = AdaptedWeight


# -- pytree registration ---------------------------------------------------------------------
# The arrays keep the key paths they have always had, whatever the state type: ``base``,
# ``a/<name>``, ``b/<name>``, ``extra/<name>/<field>`` (other trainable arrays) and
# ``cache/<name>/<field>`` (frozen ones). Paths are a public contract: optax masks and labels,
# sharding error messages and Orbax training checkpoints are keyed by them.

_GROUPS = ("a", "b", "extra", "cache")


def _group_of(state, field: str) -> str:
    if field in ("a", "b"):
        return field
    return "cache" if field in state.frozen else "extra"


def _grouped(node):
    groups = {g: {} for g in _GROUPS}
    for name, state in node.states.items():
        for field, value in state.arrays().items():
            group = _group_of(state, field)
            if group in ("a", "b"):
                groups[group][name] = value
            else:
                groups[group].setdefault(name, {})[field] = value
    return groups


def _aux(node, groups):
    kinds = tuple((name, type(state), tuple((f.name, getattr(state, f.name)) for f in dataclasses.fields(state)
                                            if f.metadata.get("static", False)))
                  for name, state in sorted(node.states.items()))
    present = tuple(g for g in _GROUPS if groups[g])   # no empty containers: a mapper may replace them
    return node.layout, node.adapters, node.active, node.path, kinds, present


def _flatten_with_keys(node):
    groups = _grouped(node)
    aux = _aux(node, groups)
    children = [(jax.tree_util.GetAttrKey("base"), node.base)]
    children += [(jax.tree_util.GetAttrKey(g), groups[g]) for g in aux[-1]]
    return children, aux


def _flatten(node):
    groups = _grouped(node)
    aux = _aux(node, groups)
    return [node.base] + [groups[g] for g in aux[-1]], aux


def _unflatten(aux, children):
    layout, adapters, active, path, kinds, present = aux
    base, *rest = children
    groups = dict(zip(present, rest))
    a, b = groups.get("a", {}), groups.get("b", {})
    extra, cache = groups.get("extra", {}), groups.get("cache", {})
    states = {}
    for name, cls, statics in kinds:
        fields = {**extra.get(name, {}), **cache.get(name, {})}
        if name in a:
            fields["a"] = a[name]
        if name in b:
            fields["b"] = b[name]
        states[name] = cls(**fields, **dict(statics))
    return AdaptedWeight(base=base, states=states, layout=layout, adapters=adapters, active=active, path=path)


jax.tree_util.register_pytree_with_keys(AdaptedWeight, _flatten_with_keys, _unflatten, _flatten)


def _has_term(state) -> bool:
    return "a" in state.arrays()


def _states_from_parts(adapters, states, a=None, b=None, extra=None, cache=None) -> dict:
    out = {}
    for name, meta in adapters:
        state = states.get(name) or state_type(meta.method).empty()
        fields = {}
        if a is not None:
            fields["a"] = a.get(name)
        if b is not None:
            fields["b"] = b.get(name)
        for part, pick in ((extra, lambda k: k not in state.frozen), (cache, lambda k: k in state.frozen)):
            if part is None:
                continue
            given = part.get(name) or {}
            unknown = sorted(set(given) - set(state.arrays()))
            if unknown:
                raise ValueError(f"adapter {name!r} ({meta.method}) keeps {sorted(state.arrays())}, not {unknown}")
            for k in state.arrays():
                if k not in ("a", "b") and pick(k):
                    fields[k] = given.get(k)
        fields = {k: v for k, v in fields.items() if k in state.arrays()}
        out[name] = state.replace(**fields) if fields else state
    return out


def _on_outputs(v, layout: Layout):
    """A stack + outputs array broadcast against a stack + inputs + outputs kernel."""
    s = layout.stack
    return v.reshape(v.shape[:s] + (1,) * layout.inputs + v.shape[s:])


def _on_inputs(v, layout: Layout):
    """A stack + inputs array broadcast against a stack + inputs + outputs kernel."""
    return v.reshape(v.shape + (1,) * layout.outputs)


def factor_product(a, b, layout: Layout):
    """``a @ b`` over the rank axis, batched over stacked axes -> stack + inputs + outputs."""
    s = layout.stack
    return lax.dot_general(
        a, b,
        dimension_numbers=(((a.ndim - 1,), (s,)), (tuple(range(s)), tuple(range(s)))),
        precision=lax.Precision.HIGHEST,
    )


def is_quantized(x) -> bool:
    """True for a :class:`jlora.quant.QuantizedArray`."""
    return isinstance(x, QuantizedArray)


def dense(base, dtype=None):
    """The base as a dense array: a quantised base is dequantised (to ``dtype`` or its own)."""
    if is_quantized(base):
        return dequantize(base, dtype)
    return base if dtype is None else base.astype(dtype)


def is_node(x) -> bool:
    """True for an adapted weight (:class:`AdaptedWeight`)."""
    return isinstance(x, AdaptedWeight)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Trainable:
    """Marks a plain leaf that is trained in full (``train_also``, PEFT's modules_to_save)."""

    value: Array
    path: str = dataclasses.field(default="", metadata=dict(static=True))

    @property
    def shape(self):
        return tuple(self.value.shape)

    @property
    def dtype(self):
        return self.value.dtype


def is_adapter_leaf(x) -> bool:
    """True for every jlora wrapper that stands in place of one original leaf."""
    return isinstance(x, (AdaptedWeight, Trainable))


def unwrap(x, dtype=None):
    """The plain array a wrapper stands for (materialising a LoRANode)."""
    if isinstance(x, AdaptedWeight):
        return x.materialize(dtype)
    if isinstance(x, Trainable):
        return x.value
    return x
