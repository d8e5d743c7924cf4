"""Sharding for adapted parameter trees: meshes, regex partition rules, and the shardings of
LoRA factors, which inherit the partitioning of the kernel they adapt.

A *rule* is ``(regex, PartitionSpec)``. A leaf's path is its '/'-joined key path
(``params/block_0/attn/query/kernel``; NNX paths drop the trailing ``value``). The first rule
whose regex ``re.search``-es the path decides the leaf's spec; anchor with ``^...$`` for an exact
match. Leaves that no rule matches are replicated.

For a :class:`~jlora.core.nodes.AdaptedWeight` at path ``p`` the rule matched on ``p`` gives the
base's spec ``(s..., i..., o...)`` (stack, input and output axes), and the factors inherit it::

    base: stack + inputs + outputs   -> P(s..., i..., o...)
    a:    stack + inputs + (rank,)   -> P(s..., i..., None)
    b:    stack + (rank,) + outputs  -> P(s..., None, o...)

so a kernel sharded ``P("fsdp", "tp")`` gets ``a: P("fsdp", None)`` and ``b: P(None, "tp")``;
``x @ a @ b`` then needs no more communication than ``x @ base``.

Example::

    from jax.sharding import PartitionSpec as P
    from jlora.distributed import make_mesh, shardings_for

    mesh = make_mesh((2, 4), ("data", "fsdp"))
    rules = [(r"kernel$", P("fsdp", None)), (r"embedding$", P(None, "fsdp"))]
    trainable, frozen = jlora.partition(jlora.apply(params, spec, key))
    frozen = jax.device_put(frozen, shardings_for(frozen, mesh, rules))
"""

from __future__ import annotations

import contextlib
import math
import re
from typing import Sequence

import jax
import numpy as np
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec as P

from jlora.core.nodes import AdaptedWeight, Trainable, is_adapter_leaf, is_node, is_quantized
from jlora.core.paths import flatten_with_paths

__all__ = [
    "make_mesh", "normalize_rules", "spec_for_path", "partition_specs", "shardings_for",
    "batch_specs", "batch_shardings", "opt_state_shardings", "replicated", "shard", "place",
    "activation_sharding", "constrain_batch", "factor_specs",
]


# ------------------------------------------------------------------------------------------
# meshes

def make_mesh(shape: Sequence[int], names: Sequence[str], *, devices=None) -> Mesh:
    """A :class:`jax.sharding.Mesh` of ``shape`` over ``devices`` (default ``jax.devices()``),
    with ``Auto`` (compiler-propagated) axes. One entry of ``shape`` may be ``-1``: it takes
    whatever the other axes leave.

    Example::

        mesh = make_mesh((2, -1), ("data", "fsdp"))   # 8 devices -> data=2, fsdp=4
    """
    shape, names = tuple(shape), tuple(names)
    if len(shape) != len(names):
        raise ValueError(f"make_mesh: shape {shape} has {len(shape)} axes but names {names} has {len(names)}")
    if len(set(names)) != len(names) or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"make_mesh: axis names must be distinct non-empty strings, got {names}")
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if any((not isinstance(s, int) or isinstance(s, bool)) or (s < 1 and s != -1) for s in shape) or shape.count(-1) > 1:
        raise ValueError(f"make_mesh: shape entries must be positive ints (at most one -1), got {shape}")
    if -1 in shape:
        known = math.prod(s for s in shape if s != -1)
        if n % known:
            raise ValueError(f"make_mesh: {n} devices cannot be split into shape {shape} ({n} is not divisible by {known})")
        shape = tuple(n // known if s == -1 else s for s in shape)
    if math.prod(shape) != n:
        hint = ("; for tests on CPU, set XLA_FLAGS=--xla_force_host_platform_device_count=N "
                "before jax is imported") if devices and devices[0].platform == "cpu" else ""
        raise ValueError(f"make_mesh: shape {shape} needs {math.prod(shape)} devices, have {n}{hint}")
    auto = (jax.sharding.AxisType.Auto,) * len(shape)
    return jax.make_mesh(shape, names, axis_types=auto, devices=devices)


def parse_mesh(text) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """``"data=2,fsdp=4"`` -> ``((2, 4), ("data", "fsdp"))`` (one size may be ``-1``: whatever the
    devices leave, see :func:`make_mesh`); ``ValueError`` naming the bad part for anything else."""
    def bad(why):
        raise ValueError(f"must be name=size pairs like data=2,fsdp=4 ({why}), got {text!r}")

    if not isinstance(text, str) or not text.strip():
        bad("empty")
    shape, names = [], []
    for part in text.split(","):
        name, sep, size = part.strip().partition("=")
        if not sep or not name.strip().isidentifier():
            bad(f"{part.strip()!r} is not name=size")
        try:
            n = int(size)
        except ValueError:
            bad(f"size {size!r} of {name.strip()!r} is not an integer")
        if n < 1 and n != -1:
            bad(f"size {n} of {name.strip()!r} is not positive (or -1)")
        names.append(name.strip())
        shape.append(n)
    if len(set(names)) != len(names):
        bad("an axis is named twice")
    if shape.count(-1) > 1:
        bad("at most one size may be -1")
    return tuple(shape), tuple(names)


def replicated(mesh: Mesh) -> NamedSharding:
    """The fully replicated sharding on ``mesh``."""
    return NamedSharding(mesh, P())


# ------------------------------------------------------------------------------------------
# rules -> PartitionSpecs

def _as_spec(spec, where) -> P:
    if spec is None:
        return P()
    if isinstance(spec, P):
        return spec
    if isinstance(spec, (tuple, list)):
        return P(*spec)
    raise TypeError(f"{where}: a rule's spec must be a jax.sharding.PartitionSpec (or a tuple), got {spec!r}")


def normalize_rules(rules) -> tuple[tuple[re.Pattern, P], ...]:
    """Validates ``[(regex, PartitionSpec), ...]`` (a dict also works) and compiles the regexes."""
    if rules is None:
        return ()
    if isinstance(rules, dict):
        rules = list(rules.items())
    out = []
    try:
        items = list(rules)
    except TypeError:
        raise TypeError(f"rules must be a list of (regex, PartitionSpec) pairs, got {rules!r}") from None
    for i, rule in enumerate(items):
        if isinstance(rule, tuple) and len(rule) == 2 and isinstance(rule[0], re.Pattern):
            out.append((rule[0], _as_spec(rule[1], f"rule {i}")))
            continue
        if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)):
            raise TypeError(f"rule {i} must be a (regex string, PartitionSpec) pair, got {rule!r}")
        try:
            pattern = re.compile(rule[0])
        except re.error as e:
            raise ValueError(f"rule {i}: {rule[0]!r} is not a valid regex: {e}") from None
        out.append((pattern, _as_spec(rule[1], f"rule {i} ({rule[0]!r})")))
    return tuple(out)


def spec_for_path(path: str, rules) -> P | None:
    """The spec of the first rule whose regex ``re.search``-es ``path``; ``None`` if none does."""
    for pattern, spec in normalize_rules(rules):
        if pattern.search(path):
            return spec
    return None


def _padded(spec: P, ndim: int, path: str, shape) -> tuple:
    entries = tuple(spec)
    if len(entries) > ndim:
        raise ValueError(
            f"sharding rule gives {path!r} (shape {tuple(shape)}, {ndim} axes) the spec {spec}, "
            f"which has {len(entries)} entries; a spec may have at most one entry per axis")
    return entries + (None,) * (ndim - len(entries))


def _state_specs(state, a_spec: P, b_spec: P, vector_spec: P):
    """A state holding a spec in place of each array: ``a`` (stack + inputs + r) and ``b`` (stack +
    r + outputs) inherit the base's axes; any other array (a magnitude, singular values, scales, a
    cached norm) keeps only the stacked-layer axes."""
    pick = {"a": a_spec, "b": b_spec}
    return state.replace(**{k: None if v is None else pick.get(k, vector_spec) for k, v in state.arrays().items()})


def factor_specs(base_spec: P, layout) -> tuple[P, P, P]:
    """``(a_spec, b_spec, vector_spec)`` of the adapter arrays on a kernel laid out as ``base_spec``
    (stack + inputs + outputs; see the module docstring): A keeps the stack and input axes, B the
    stack and output axes, per-adapter vectors (magnitudes, scales) the stack axes."""
    entries = tuple(base_spec) + (None,) * (layout.ndim - len(tuple(base_spec)))
    s, i = layout.stack, layout.stack + layout.inputs
    return P(*entries[:i], None), P(*entries[:s], None, *entries[i:]), P(*entries[:s])


def _node_specs(node: AdaptedWeight, spec: P | None, path: str):
    """(base_spec, a_spec, b_spec, vector_spec) for a node: the factors inherit the base's axes, its
    small per-adapter arrays (DoRA magnitude, AdaLoRA singular values, IA3 scales, cached norms) the
    stacked-layer axes only (:func:`factor_specs`)."""
    layout = node.layout
    shape = node.shape if node.base is not None else None
    if spec is None:
        return P(), P(), P(), P()
    entries = _padded(spec, layout.ndim, path, shape if shape is not None else f"<{layout.ndim} axes>")
    return (P(*entries), *factor_specs(P(*entries), layout))


def _quantized_specs(q, kernel_spec: P, stack: int):
    """Per-field specs of a quantised base from its kernel's spec. Every field is ``stack + (n,)``
    (codes, block scales, double-quant scales; the double-quant offset is ``stack + ()``), the
    flattened kernel in C order: its stack axes take the kernel's stack entries, and the flat axis
    takes every mesh axis of the kernel's matrix axes (input axes first). Splitting the flat codes
    by the input axis alone is exactly the kernel's row split; with more axes it is a storage split
    (FSDP: each device holds 1/N of the codes and the step gathers them before dequantising). Where
    a field's length does not divide, :func:`shardings_for` falls back to fewer axes."""
    entries = tuple(kernel_spec)
    names = tuple(n for e in entries[stack:] for n in _axis_names(e))
    flat = None if not names else names[0] if len(names) == 1 else names

    def one(x):
        nd = len(np.shape(x))
        return P(*entries[:stack], *((flat,) if nd > stack else ()))

    return jax.tree_util.tree_map(one, q)


def _fit_quantized(spec: P, shape, mesh: Mesh, stack: int) -> P:
    """``spec`` with its flat-axis entry cut back (whole tuple, then its first axis, then nothing)
    until the field's flat length divides by the mesh axes' sizes."""
    entries = tuple(spec)
    if len(entries) <= stack:
        return spec
    names = _axis_names(entries[stack])
    n = tuple(shape)[stack]
    for k in range(len(names), 0, -1):
        if n % math.prod(mesh.shape[a] for a in names[:k] if a in mesh.shape) == 0:
            kept = names[:k]
            return P(*entries[:stack], kept[0] if len(kept) == 1 else kept)
    return P(*entries[:stack], None)


def _is_spec(x) -> bool:
    return isinstance(x, P)


def _map_leaves(tree, fn):
    """``fn(path, leaf)`` over the adapter-aware leaves of ``tree`` (None entries stay None)."""
    flat, treedef = flatten_with_paths(tree, is_leaf=is_adapter_leaf)
    return jax.tree_util.tree_unflatten(treedef, [fn(path, leaf) for path, leaf in flat])


def partition_specs(tree, rules):
    """A tree like ``tree`` holding a :class:`PartitionSpec` in place of every array (inside
    adapter nodes too; ``None`` entries stay ``None``). Needs no mesh and does not validate
    sizes; see :func:`shardings_for`.

    Example::

        specs = partition_specs(adapted, [(r"kernel$", P("fsdp", None))])
        specs["params"]["Dense_0"]["kernel"].a["default"]   # P('fsdp', None)
    """
    rules = normalize_rules(rules)

    def one(path, leaf):
        spec = spec_for_path(path, rules)
        if is_node(leaf):
            base_s, a_s, b_s, v_s = _node_specs(leaf, spec, path)
            if is_quantized(leaf.base):
                base_s = _quantized_specs(leaf.base, base_s, leaf.layout.stack)
            return leaf.with_(base=None if leaf.base is None else base_s,
                              states={n: _state_specs(st, a_s, b_s, v_s) for n, st in leaf.states.items()})
        if isinstance(leaf, Trainable):
            ndim = len(np.shape(leaf.value))
            return leaf.__class__(P(*_padded(spec, ndim, path, np.shape(leaf.value))) if spec is not None else P(), leaf.path)
        if spec is None:
            return P()
        return P(*_padded(spec, len(np.shape(leaf)), path, np.shape(leaf)))

    return _map_leaves(tree, one)


# ------------------------------------------------------------------------------------------
# validation against a mesh

def _axis_names(entry) -> tuple:
    if entry is None or entry is P.UNCONSTRAINED:
        return ()
    if isinstance(entry, (tuple, list)):
        return tuple(entry)
    return (entry,)


def _check_spec(spec: P, shape, mesh: Mesh, path: str, rule: str = ""):
    sizes = dict(mesh.shape)
    shape = tuple(shape)
    where = f"{path!r} (shape {shape}, spec {spec}{rule})"
    if len(tuple(spec)) > len(shape):
        raise ValueError(f"{where}: the spec has {len(tuple(spec))} entries but the array has {len(shape)} axes")
    used = []
    for dim, entry in enumerate(tuple(spec)):
        names = _axis_names(entry)
        unknown = [n for n in names if n not in sizes]
        if unknown:
            raise ValueError(f"{where}: mesh axis {unknown[0]!r} is not in the mesh, whose axes are "
                             f"{dict(sizes)}")
        used += names
        size = math.prod(sizes[n] for n in names)
        if names and shape[dim] % size:
            raise ValueError(
                f"{where}: axis {dim} has size {shape[dim]}, which is not divisible by mesh axes {names} "
                f"of total size {size}; change the rule or pad the dimension")
    dup = sorted({n for n in used if used.count(n) > 1})
    if dup:
        raise ValueError(f"{where}: mesh axis {dup[0]!r} is used for more than one array axis")


def shardings_for(tree, mesh: Mesh, rules):
    """A tree like ``tree`` with a :class:`NamedSharding` on ``mesh`` in place of every array
    (``None`` entries, as in the halves of :func:`jlora.partition`, stay ``None``).

    Rules are matched on each leaf's path (for a LoRA node: the node's path, and the factors
    inherit the base's axes; see the module docstring). Unmatched leaves are replicated. Raises
    ``ValueError`` naming the path, shape and spec when a spec names an axis the mesh lacks or a
    sharded dimension is not divisible by its mesh axes. ``tree`` may hold arrays or
    ``jax.ShapeDtypeStruct``s.

    Example::

        trainable, frozen = jlora.partition(adapted)
        t_sh = shardings_for(trainable, mesh, [(r"kernel$", P("fsdp", None))])
        trainable = jax.device_put(trainable, t_sh)
    """
    if not isinstance(mesh, (Mesh, AbstractMesh)):   # an AbstractMesh: shapes only (planning, jlora.estimate)
        raise TypeError(f"mesh must be a jax.sharding.Mesh (see jlora.distributed.make_mesh) or AbstractMesh, got "
                        f"{type(mesh).__name__}")
    rules = normalize_rules(rules)
    flat, _ = flatten_with_paths(tree, is_leaf=is_adapter_leaf)
    specs = partition_specs(tree, rules)
    flat_specs, treedef = flatten_with_paths(specs, is_leaf=is_adapter_leaf)

    def rule_of(path):
        for pattern, spec in rules:
            if pattern.search(path):
                return f", from rule {pattern.pattern!r}"
        return ""

    out = []
    for (path, leaf), (_, spec) in zip(flat, flat_specs):
        if is_node(leaf):
            r = rule_of(path)
            if is_quantized(leaf.base):
                stack = leaf.layout.stack
                fitted = [_fit_quantized(part, np.shape(value), mesh, stack) for part, value in
                          zip(jax.tree_util.tree_leaves(spec.base, is_leaf=_is_spec), jax.tree_util.tree_leaves(leaf.base))]
                for part, value in zip(fitted, jax.tree_util.tree_leaves(leaf.base)):
                    _check_spec(part, np.shape(value), mesh, f"{path}/base", r)
                spec = spec.with_(base=jax.tree_util.tree_unflatten(
                    jax.tree_util.tree_structure(spec.base, is_leaf=_is_spec), fitted))
            elif leaf.base is not None:
                _check_spec(spec.base, leaf.base.shape, mesh, path, r)
            for name, state in leaf.states.items():
                for k, v in state.arrays().items():
                    if v is not None:
                        _check_spec(getattr(spec.states[name], k), v.shape, mesh, f"{path}/{k}/{name}", r)
            wrap = lambda s: None if s is None else NamedSharding(mesh, s)
            base = (jax.tree_util.tree_map(wrap, spec.base, is_leaf=_is_spec) if is_quantized(leaf.base)
                    else wrap(spec.base))
            out.append(spec.with_(base=base,
                                  states={n: st.replace(**{k: wrap(v) for k, v in st.arrays().items()})
                                          for n, st in spec.states.items()}))
        elif isinstance(leaf, Trainable):
            _check_spec(spec.value, np.shape(leaf.value), mesh, path, rule_of(path))
            out.append(leaf.__class__(NamedSharding(mesh, spec.value), leaf.path))
        else:
            _check_spec(spec, np.shape(leaf), mesh, path, rule_of(path))
            out.append(NamedSharding(mesh, spec))
    return jax.tree_util.tree_unflatten(treedef, out)


def _host_local_to_global(x, sharding):
    """A global array on ``sharding`` from a value every process holds in full (the same on each)."""
    if jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key):
        data = np.asarray(jax.device_get(jax.random.key_data(x)))
        arr = jax.make_array_from_callback(data.shape, sharding, lambda idx: data[idx])
        return jax.random.wrap_key_data(arr, impl=jax.random.key_impl(x))
    value = np.asarray(jax.device_get(x))
    return jax.make_array_from_callback(value.shape, sharding, lambda idx: value[idx])


def place(tree, shardings):
    """``jax.device_put(tree, shardings)`` that also works with many processes: a leaf that every
    process holds in full (a numpy array, or a ``jax.Array`` on this process's devices, as
    ``jlora.apply`` or a checkpoint load on each process gives) becomes one global array laid out by
    its sharding, each process filling in its own devices' pieces. The values must be the same on
    every process (same seed, same file). Leaves already laid out as asked are not copied;
    ``None`` shardings leave their leaf alone.

    Example::

        trainable = place(trainable, shardings_for(trainable, mesh, rules))
    """
    def one(s, x):
        if s is None or x is None or isinstance(x, jax.core.Tracer):   # traced: the jit's in_shardings place it
            return x
        if isinstance(x, jax.Array) and x.sharding == s:
            return x
        if (jax.process_count() == 1 or s.is_fully_addressable
                or (isinstance(x, jax.Array) and not x.is_fully_addressable)):
            return jax.device_put(x, s)
        return _host_local_to_global(x, s)

    return jax.tree_util.tree_map(one, shardings, tree,
                                  is_leaf=lambda s: s is None or isinstance(s, jax.sharding.Sharding))


def shard(tree, mesh: Mesh, rules):
    """``place(tree, shardings_for(tree, mesh, rules))``: the tree laid out on ``mesh`` by ``rules``."""
    return place(tree, shardings_for(tree, mesh, rules))


# ------------------------------------------------------------------------------------------
# batches and optimizer state

def _batch_axes(mesh: Mesh, batch_axes) -> tuple:
    axes = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes or ())
    missing = [a for a in axes if a not in mesh.shape]
    if missing:
        raise ValueError(f"batch axis {missing[0]!r} is not in the mesh, whose axes are {dict(mesh.shape)}; "
                         f"pass batch_axes= naming the data-parallel mesh axes")
    return axes


def batch_entry(axes: tuple):
    """The ``PartitionSpec`` entry that splits one array axis over the mesh axes ``axes``: ``None``
    for none, the name for one, the tuple for several."""
    return None if not axes else axes[0] if len(axes) == 1 else tuple(axes)


def batch_specs(batch, batch_axes=("data",)):
    """A ``PartitionSpec`` per batch leaf: its leading dim over ``batch_axes``; scalars replicated."""
    axes = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes or ())
    entry = batch_entry(axes)

    def one(x):
        return P(entry) if axes and np.ndim(x) >= 1 else P()

    return jax.tree_util.tree_map(one, batch)


def batch_shardings(batch, mesh: Mesh, batch_axes=("data",)):
    """``NamedSharding``s splitting each batch leaf's leading dim over ``batch_axes``.

    Example::

        batch = jax.device_put(batch, batch_shardings(batch, mesh, ("data", "fsdp")))
    """
    axes = _batch_axes(mesh, batch_axes)
    size = math.prod(mesh.shape[a] for a in axes)
    flat, treedef = flatten_with_paths(batch)
    for path, x in flat:
        shape = np.shape(x)
        if axes and len(shape) >= 1 and shape[0] % size:
            raise ValueError(f"batch leaf {path or '<root>'!r} (shape {tuple(shape)}) has leading dim {shape[0]}, "
                             f"which is not divisible by the {size} devices of batch axes {axes}")
    return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), batch_specs(batch, axes))


def opt_state_shardings(opt_state, trainable, trainable_shardings, mesh: Mesh):
    """Shardings for an optax state: every sub-tree shaped like ``trainable`` (Adam's ``mu`` and
    ``nu``, momentum traces, ...) gets ``trainable_shardings``; everything else (step counts,
    scalars) is replicated.

    Example::

        opt_state = optimizer.init(trainable)
        o_sh = opt_state_shardings(opt_state, trainable, shardings_for(trainable, mesh, rules), mesh)
    """
    treedef = jax.tree_util.tree_structure(trainable)
    shapes = [np.shape(x) for x in jax.tree_util.tree_leaves(trainable)]
    rep = replicated(mesh)

    def like_params(x):
        try:
            if jax.tree_util.tree_structure(x) != treedef:
                return False
        except Exception:  # pragma: no cover - odd leaves
            return False
        return [np.shape(l) for l in jax.tree_util.tree_leaves(x)] == shapes

    def one(x):
        if like_params(x):
            return trainable_shardings
        return jax.tree_util.tree_map(lambda _: rep, x)

    return jax.tree_util.tree_map(one, opt_state, is_leaf=like_params)


# ------------------------------------------------------------------------------------------
# activations

# A JAX user context, not a thread-local: its value is part of JAX's tracing and compilation cache
# keys, so a function traced once outside a sharded step (jlora.apply's axis inference, an
# evaluation) and once inside it gets two traces, with and without the constraints. (With a plain
# thread-local the inner remat / scan traces were reused from the first, unconstrained trace.)
_ACTIVATIONS = jax.make_user_context(default_value=None)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, batch_axes=("data",)):
    """While tracing inside this context, :func:`constrain_batch` pins activations' leading (batch)
    dim to ``batch_axes`` of ``mesh``. :func:`jlora.train.make_step` enters it around the loss when
    it has a mesh, so a model that calls :func:`constrain_batch` at its layer boundaries keeps every
    layer's activations split over the batch axes, whichever axes (``data``, ``fsdp``) those are.

    Without it GSPMD may propagate a parameter's ``fsdp`` sharding into the activations and run
    the layers on the whole global batch (model parallelism in disguise: activation memory that
    does not fall as devices are added).
    """
    axes = _batch_axes(mesh, batch_axes)
    with _ACTIVATIONS((mesh, axes)):
        yield


def constrain_batch(x):
    """The hook a model calls on its activations (``(batch, ...)`` arrays) at layer boundaries: inside
    :func:`activation_sharding` (which ``make_step(mesh=...)`` enters) it is
    ``jax.lax.with_sharding_constraint(x, P(batch_axes, UNCONSTRAINED, ...))``; outside, and when the
    batch dim does not divide over the batch axes (a single example in generation), it returns ``x``.
    jlora's Llama, BERT and ViT call it on every layer's input and output.

    Example (a Flax module of your own)::

        from jlora.distributed import constrain_batch

        def __call__(self, x):
            for layer in self.layers:
                x = constrain_batch(layer(x))
            return x
    """
    ctx = _ACTIVATIONS.value
    if ctx is None:
        return x
    mesh, axes = ctx
    ndim = len(np.shape(x))
    if not axes or ndim < 1:
        return x
    size = math.prod(mesh.shape[a] for a in axes)
    if size == 1 or np.shape(x)[0] % size:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(batch_entry(axes), *(P.UNCONSTRAINED,) * (ndim - 1))))
