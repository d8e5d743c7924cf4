"""apply / partition / combine / merge / unmerge / summary / multi-adapter operations."""

from __future__ import annotations

import math
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jlora.core import axes as axes_mod
from jlora.core.nodes import (AdaptedWeight, AdapterMeta, Layout, Trainable, factor_product, is_adapter_leaf, is_node,
                              is_quantized, unwrap)
from jlora.core.paths import flatten_with_paths, matches, near_misses, normalize_patterns
from jlora.core.spec import AdapterSpec, resolve_hint
from jlora.core.state import LoRAState
from jlora.quant import dequantize, requantize_like

DEFAULT_NAME = "default"


# ------------------------------------------------------------------------------------------
# expanders: methods whose per-leaf factors are derived from parameters shared by several leaves

_EXPANDERS: dict = {}   # reserved top-level key -> (expand_fn, summary_fn or None)


def register_expander(key: str, fn, summary=None, prune=None):
    """Registers a method that keeps shared parameters under the reserved top-level entry ``key``
    of an adapted tree (e.g. tCURLoRA's ``"jlora_tcur"``: one trainable core per stacked tensor).

    ``fn(tree) -> tree`` must return the tree without ``key`` and with every node of that method
    given real factors ``a`` / ``b`` (differentiable in the shared parameters); ``summary(tree) ->
    list of lines`` adds rows to :func:`summary`; ``prune(tree) -> tree`` drops the shared parameters
    no node uses any more (called by :func:`delete_adapter`). :func:`jlora.lift`, :func:`merge`,
    :func:`unmerge` and :func:`summary` call :func:`expand` on any tree holding ``key``."""
    if not isinstance(key, str) or not key:
        raise ValueError(f"expander key must be a non-empty string, got {key!r}")
    _EXPANDERS[key] = (fn, summary, prune)


def reserved_keys(tree) -> tuple:
    """The registered reserved top-level keys that ``tree`` holds."""
    if not isinstance(tree, Mapping):
        return ()
    return tuple(k for k in _EXPANDERS if k in tree)


def expand(tree):
    """``tree`` with every registered method's shared parameters turned into per-node factors
    (and the reserved top-level entries removed); anything else is returned unchanged."""
    for key in reserved_keys(tree):
        tree = _EXPANDERS[key][0](tree)
    return tree


# ------------------------------------------------------------------------------------------
# saved entries: reserved top-level entries that a saved adapter holds and plain params lack

_SAVED_ENTRIES: dict = {}   # reserved top-level key -> (placeholders(records) -> subtree, what)


def register_saved_entry(key: str, placeholders, what: str):
    """Registers a method whose trainable parameters live under the reserved top-level entry ``key``
    of an adapted tree (the prompt family's ``"jlora_prompt"``): ``placeholders(records)`` builds that
    entry, with zero-filled ``Trainable`` leaves, from the adapter checkpoint's records of the leaves
    under it, so :func:`jlora.io.load_adapter` can restore it onto plain params. ``what`` names it in
    messages ("a prompt")."""
    if not isinstance(key, str) or not key:
        raise ValueError(f"saved entry key must be a non-empty string, got {key!r}")
    _SAVED_ENTRIES[key] = (placeholders, what)


def saved_entries() -> dict:
    """``{key: (placeholders, what)}`` of the registered saved entries."""
    return dict(_SAVED_ENTRIES)


def with_entry(params, key: str, value):
    """``params`` (a dict or FrozenDict of collections) with the top-level entry ``key`` set to ``value``."""
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be a mapping of collections (e.g. {{'params': ...}}), got {type(params).__name__}")
    if type(params).__name__ == "FrozenDict":
        return params.copy({key: value})
    out = dict(params)
    out[key] = value
    return out


def _is_array(x) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


def _own_copy(x):
    """A trained-in-full leaf gets its own buffer: a training step donates ``trainable``, which
    must never delete the caller's original params."""
    return jnp.array(x, copy=True)


def _is_float(x) -> bool:
    return _is_array(x) and jnp.issubdtype(x.dtype, jnp.floating)


def layout_for(spec, path, leaf, inferred, index):
    """The :class:`Layout` of ``leaf`` at ``path``: the spec's ``axes`` hint, else the layout traced
    from the model (``inferred[index]``), else (in, out) for a 2-D kernel; otherwise an error that
    names the hint to add."""
    for pattern, hint in spec.axes_hints():
        if matches(path, (pattern,)):
            return resolve_hint(hint, leaf.shape, path)
    if index in inferred:
        return inferred[index]
    if leaf.ndim == 2:
        return Layout(0, 1, 1)
    raise ValueError(
        f"cannot tell which axes of {path!r} (shape {tuple(leaf.shape)}) are stacked layers, inputs and "
        f"outputs. Pass model=fn, example=args to jlora.apply so it can trace how the kernel is used, "
        f"or add a hint: axes={{{path.rsplit('/', 2)[-2] + '/kernel'!r}: jlora.Axes(stack=S, inputs=I)}} "
        f"(e.g. jlora.Axes(stack=1, inputs=1) for a scanned (layers, in, out) kernel, "
        f"jlora.Axes(stack=0, inputs=1) for a (d_model, heads, head_dim) projection).")


def apply(params, spec, key=None, *, name: str = DEFAULT_NAME, model=None, example=None):
    """Adds the adapter described by ``spec`` to every leaf of ``params`` that it targets.

    Returns a tree with the same structure where each matched kernel is an :class:`AdaptedWeight`
    (frozen base + trainable factors) and each ``train_also`` leaf is a :class:`Trainable`.
    Works on Linen variable dicts (dict / FrozenDict) and NNX ``State``. Calling it again on an
    adapted tree with another ``name`` adds a second adapter to the same bases.

    Example:

    >>> import jax, jax.numpy as jnp, numpy as np, jlora
    >>> params = {"params": {"fc": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}}}
    >>> adapted = jlora.apply(params, jlora.LoRA(rank=2, alpha=4, targets="fc"), key=jax.random.key(0))
    >>> node = adapted["params"]["fc"]["kernel"]
    >>> type(node).__name__, node.states["default"].a.shape, node.states["default"].b.shape
    ('AdaptedWeight', (4, 2), (2, 3))
    >>> adapted["params"]["fc"]["bias"].shape           # "fc" adapts the module's kernel only
    (3,)
    """
    if not isinstance(spec, AdapterSpec):
        raise TypeError(f"spec must be a jlora method spec such as jlora.LoRA(...), got {spec!r}")
    if not isinstance(name, str) or not name or "/" in name:
        raise ValueError(f"adapter name must be a non-empty string without '/', got {name!r}")
    if key is None:
        key = jax.random.key(0)
    if isinstance(key, int):
        key = jax.random.key(key)
    if spec.shares_parameters:  # methods that adapt several leaves jointly (tCURLoRA)
        return spec.apply_tree(params, key, name=name, model=model, example=example)
    flat, treedef = flatten_with_paths(params, is_leaf=is_adapter_leaf)
    paths = [p for p, _ in flat]
    inferred = {}
    if model is not None:
        if example is None:
            raise ValueError("jlora.apply(model=fn) also needs example=args (inputs fn is called with)")
        inferred = axes_mod.infer_layouts(model, params, example, is_leaf=is_adapter_leaf)

    # PEFT: a name in a list targets that module's kernel (``"query"`` adapts query/kernel, not
    # query/bias), and modules_to_save (``train_also``) are never targeted.
    targeted = [i for i, p in enumerate(paths)
                if matches(p, spec.targets) and not matches(p, spec.exclude)
                and not (spec.train_also and matches(p, spec.train_also))
                and (matches(p, spec.targets, modules=False)
                     or (_adaptable(flat[i][1]) and p.rsplit("/", 1)[-1] in _WEIGHT_NAMES))]
    if not targeted:
        raise ValueError(
            f"targets {list(spec.targets)} matched no parameter path (exclude={list(spec.exclude)}). "
            f"Closest paths: {near_misses(spec.targets, paths)}")
    bad = [paths[i] for i in targeted if not _adaptable(flat[i][1])]
    if bad:
        raise ValueError(
            f"targets {list(spec.targets)} match leaves that cannot be adapted (need a floating kernel with "
            f">= 2 axes): {[(p, _shape_of(dict(flat)[p])) for p in bad][:8]}. Narrow the pattern, e.g. end it in '/kernel'; "
            f"adaptable paths include {[p for p in paths if _is_float(unwrap(dict(flat)[p])) and unwrap(dict(flat)[p]).ndim >= 2][:8]}")

    frozen_q = spec.frozen_patterns()
    new_leaves = []
    for i, (path, leaf) in enumerate(flat):
        if i in targeted:
            leaf = _add_adapter(spec, jax.random.fold_in(key, i), path, leaf, name, inferred, i)
        elif (frozen_q and matches(path, frozen_q, modules=False) and not matches(path, spec.exclude)
              and not (spec.train_also and matches(path, spec.train_also)) and _adaptable(leaf)):
            # QLoRA's quantize_frozen: a node with a quantised base and no adapter
            layout = layout_for(spec, path, leaf, inferred, i)
            leaf = AdaptedWeight(base=spec.quantize_base(leaf, layout), states={}, layout=layout,
                                 adapters=(), active=(), path=path)
        elif spec.train_also and matches(path, spec.train_also) and not is_adapter_leaf(leaf):
            if not _is_float(leaf):
                raise ValueError(f"train_also matched {path!r}, which is not a floating array ({leaf!r:.80})")
            leaf = Trainable(_own_copy(leaf), path)
        new_leaves.append(leaf)
    if spec.train_also and not any(matches(p, spec.train_also) for p in paths):
        raise ValueError(f"train_also {list(spec.train_also)} matched no parameter path. Closest: {near_misses(spec.train_also, paths)}")
    return jax.tree_util.tree_unflatten(treedef, new_leaves)


_WEIGHT_NAMES = ("kernel", "embedding", "weight")  # what a module name in `targets` adapts


def _adaptable(leaf) -> bool:
    return is_node(leaf) or (_is_float(unwrap(leaf)) and unwrap(leaf).ndim >= 2)


def _shape_of(x):
    x = x.base if is_node(x) else unwrap(x)
    return tuple(np.shape(x))


def _add_adapter(spec, key, path, leaf, name, inferred, index):
    if isinstance(leaf, Trainable):
        raise ValueError(f"{path!r} is trained in full (train_also); it cannot also carry an adapter")
    if is_node(leaf):
        if name in leaf.names:
            raise ValueError(f"{path!r} already has an adapter named {name!r}; pass another name=")
        state, new_base, meta = spec.init_state(key, leaf.base, leaf.layout, path, embedding=_is_embedding(path))
        if new_base is not leaf.base:
            raise ValueError(f"init={meta.init!r} rewrites the base weight; it can only be the first adapter on {path!r}")
        node = leaf
    else:
        layout = layout_for(spec, path, leaf, inferred, index)
        state, new_base, meta = spec.init_state(key, leaf, layout, path, embedding=_is_embedding(path))
        node = AdaptedWeight(base=new_base, states={}, layout=layout, adapters=(), active=(), path=path)
    return node.add_adapter(name, state, meta)


def _is_embedding(path: str) -> bool:
    return path.rsplit("/", 1)[-1] == "embedding"


def mark_trainable(params, patterns):
    """Marks every floating leaf whose path matches ``patterns`` as trained in full (a
    :class:`Trainable`), with no adapter: e.g. head-only training or full fine-tuning of a subset.

    Example:

    >>> import jax, jax.numpy as jnp, numpy as np, jlora
    >>> params = {"params": {"fc": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}}}
    >>> marked = jlora.mark_trainable(params, r".*/fc/bias")
    >>> trainable, frozen = jlora.partition(marked)
    >>> trainable["params"]["fc"]["kernel"] is None, trainable["params"]["fc"]["bias"].shape
    (True, (3,))
    """
    patterns = normalize_patterns(patterns, "patterns")
    if not patterns:
        raise ValueError("mark_trainable needs at least one path pattern")
    flat, treedef = flatten_with_paths(params, is_leaf=is_adapter_leaf)
    hit = [i for i, (p, leaf) in enumerate(flat) if matches(p, patterns, modules=False) and not is_adapter_leaf(leaf)]
    if not hit:
        raise ValueError(f"patterns {list(patterns)} matched no plain leaf. Closest paths: "
                         f"{near_misses(patterns, [p for p, _ in flat])}")
    leaves = []
    for i, (path, leaf) in enumerate(flat):
        if i in hit:
            if not _is_float(leaf):
                raise ValueError(f"{path!r} is not a floating array and cannot be trained")
            leaf = Trainable(_own_copy(leaf), path)
        leaves.append(leaf)
    return jax.tree_util.tree_unflatten(treedef, leaves)


# ------------------------------------------------------------------------------------------
# partition / combine

def partition(adapted):
    """Splits an adapted tree into ``(trainable, frozen)``: two trees of the same structure,
    each with ``None`` where the other holds the value. Only ``trainable`` should be given to
    ``jax.grad`` and the optimizer.

    Example:

    >>> import jax, jax.numpy as jnp, numpy as np, jlora
    >>> params = {"params": {"fc": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}}}
    >>> adapted = jlora.apply(params, jlora.DoRA(rank=2, targets="fc"), key=jax.random.key(0))
    >>> trainable, frozen = jlora.partition(adapted)
    >>> t, f = trainable["params"]["fc"]["kernel"], frozen["params"]["fc"]["kernel"]
    >>> t.base is None, t.states["default"].m.shape, t.states["default"].w0_sq is None   # DoRA's norm cache is frozen
    (True, (3,), True)
    >>> f.base.shape, f.states["default"].a is None
    ((4, 3), True)
    """
    def split(leaf, train):
        if is_node(leaf):
            return leaf.split(train)
        if isinstance(leaf, Trainable):
            return leaf if train else None
        return None if train else leaf

    trainable = jax.tree_util.tree_map(lambda l: split(l, True), adapted, is_leaf=is_adapter_leaf)
    frozen = jax.tree_util.tree_map(lambda l: split(l, False), adapted, is_leaf=is_adapter_leaf)
    return trainable, frozen


def combine(trainable, frozen):
    """Inverse of :func:`partition`: ``combine(*partition(t)) == t``.

    Example:

    >>> import jax, jax.numpy as jnp, numpy as np, jlora
    >>> params = {"params": {"fc": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}}}
    >>> adapted = jlora.apply(params, jlora.LoRA(rank=2, targets="fc"), key=jax.random.key(0))
    >>> again = jlora.combine(*jlora.partition(adapted))
    >>> jax.tree_util.tree_structure(again) == jax.tree_util.tree_structure(adapted)
    True
    """
    return jax.tree_util.tree_map(
        lambda t, f: f if t is None else t, trainable, frozen,
        is_leaf=lambda x: x is None or isinstance(x, Trainable))


# ------------------------------------------------------------------------------------------
# merge / unmerge

def merge(adapted, dtype=None, requantize: bool = False):
    """Plain params again: every adapter node becomes ``base + sum(active deltas)`` in the base's
    dtype (or ``dtype``); ``Trainable`` wrappers are unwrapped.

    A quantised base (QLoRA) is dequantised and the delta added in full precision; with
    ``requantize=True`` the merged weight is quantised again with the base's scheme (lossy: see
    :func:`merge_error`), so the result keeps the 4-bit storage.

    Example:

    >>> import jax, jax.numpy as jnp, numpy as np, jlora
    >>> params = {"params": {"fc": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}}}
    >>> adapted = jlora.apply(params, jlora.LoRA(rank=2, alpha=2, targets="fc"), key=jax.random.key(0))
    >>> node = adapted["params"]["fc"]["kernel"]
    >>> adapted["params"]["fc"]["kernel"] = node.with_(states={"default": node.states["default"].replace(
    ...     b=jnp.ones((2, 3)))})
    >>> merged = jlora.merge(adapted)                    # W0 + (alpha / r) * A @ B, plain arrays again
    >>> a = np.asarray(node.states["default"].a)
    >>> bool(np.allclose(merged["params"]["fc"]["kernel"], 1 + a @ np.ones((2, 3))))
    True
    """
    adapted = expand(adapted)

    def one(leaf):
        if is_node(leaf) and requantize and leaf.quantized:
            return requantize_like(leaf.materialize(jnp.float32), leaf.base)
        return unwrap(leaf, dtype) if is_adapter_leaf(leaf) else leaf

    return jax.tree_util.tree_map(one, adapted, is_leaf=is_adapter_leaf)


def merge_error(adapted) -> dict:
    """For every quantised node: ``||requant(deq(W) + dW) - (deq(W) + dW)|| / ||dW||``, the
    relative error that ``merge(..., requantize=True)`` introduces (``{path: error}``)."""
    out = {}
    for path, leaf in flatten_with_paths(adapted, is_leaf=is_adapter_leaf)[0]:
        if is_node(leaf) and leaf.quantized and leaf.active:
            exact = leaf.materialize(jnp.float32)
            again = dequantize(requantize_like(exact, leaf.base), jnp.float32)
            out[path] = float(jnp.linalg.norm(again - exact) / jnp.maximum(jnp.linalg.norm(leaf.delta()), 1e-30))
    return out


def unmerge(merged, adapted):
    """Recovers the base weights from ``merged`` by subtracting the active deltas of
    ``adapted`` (the inverse of :func:`merge`, up to float round-off). For a quantised base the
    original codes held by ``adapted`` are returned exactly.

    Example:

    >>> import jax, jax.numpy as jnp, numpy as np, jlora
    >>> params = {"params": {"fc": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}}}
    >>> adapted = jlora.apply(params, jlora.LoRA(rank=2, targets="fc", init="pissa"), key=jax.random.key(0))
    >>> restored = jlora.unmerge(jlora.merge(adapted), adapted)
    >>> node = restored["params"]["fc"]["kernel"]
    >>> bool(np.allclose(node.materialize(), params["params"]["fc"]["kernel"], atol=1e-5))
    True
    """
    reserved = reserved_keys(adapted)
    expanded = expand(adapted)
    kept = {k: adapted[k] for k in reserved}
    if reserved:  # the nodes keep their shared-parameter form; only their bases come from `merged`
        adapted = type(adapted)({k: v for k, v in adapted.items() if k not in reserved})

    def undo(m, a, e):
        if is_node(a):
            shape = tuple(m.shape) if is_quantized(m) else tuple(np.shape(m))
            if shape != a.shape:
                raise ValueError(f"unmerge: merged leaf at {a.path!r} has shape {shape}, adapter expects {a.shape}")
            if a.quantized:
                return a
            return a.with_(base=e.unapply(m))
        return a if isinstance(a, Trainable) else m

    out = jax.tree_util.tree_map(lambda a, m, e: undo(m, a, e), adapted, merged, expanded, is_leaf=is_adapter_leaf)
    if reserved:
        out = type(out)({**out, **kept})
    return out


# ------------------------------------------------------------------------------------------
# multiple adapters

def adapter_names(adapted) -> tuple[str, ...]:
    """Every adapter name in ``adapted``, in the order they were first added.

    Example:

    >>> import jax, jax.numpy as jnp, numpy as np, jlora
    >>> params = {"params": {"fc": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}}}
    >>> adapted = jlora.apply(params, jlora.LoRA(rank=2, targets="fc"), key=jax.random.key(0))
    >>> adapted = jlora.apply(adapted, jlora.LoRA(rank=1, targets="fc"), name="small")
    >>> jlora.adapter_names(adapted)
    ('default', 'small')
    """
    names = []
    for leaf in jax.tree_util.tree_leaves(adapted, is_leaf=is_adapter_leaf):
        if is_node(leaf):
            for n in leaf.names:
                if n not in names:
                    names.append(n)
    return tuple(names)


def activate(adapted, names):
    """Chooses which named adapters run (and train). ``names`` is a name or a list;
    ``[]`` disables all adapters (the base model).

    Example:

    >>> import jax, jax.numpy as jnp, numpy as np, jlora
    >>> params = {"params": {"fc": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}}}
    >>> adapted = jlora.apply(params, jlora.LoRA(rank=2, targets="fc"), key=jax.random.key(0))
    >>> adapted = jlora.apply(adapted, jlora.LoRA(rank=1, targets="fc"), name="small")
    >>> jlora.activate(adapted, "small")["params"]["fc"]["kernel"].active
    ('small',)
    >>> jlora.activate(adapted, [])["params"]["fc"]["kernel"].active   # the base model
    ()
    """
    names = (names,) if isinstance(names, str) else tuple(names)
    known = adapter_names(adapted)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown adapter names {unknown}; this tree has {list(known)}")

    def act(leaf):
        if is_node(leaf):
            return leaf.with_(active=tuple(n for n in names if n in leaf.names))
        return leaf

    return jax.tree_util.tree_map(act, adapted, is_leaf=is_adapter_leaf)


def delete_adapter(adapted, name: str):
    """Removes a named adapter everywhere (nodes left with none become plain leaves; a quantised
    base stays an adapted weight with no adapter, since only lift / merge can run it).

    Example:

    >>> import jax, jax.numpy as jnp, numpy as np, jlora
    >>> params = {"params": {"fc": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}}}
    >>> adapted = jlora.apply(params, jlora.LoRA(rank=2, targets="fc"), key=jax.random.key(0))
    >>> plain = jlora.delete_adapter(adapted, "default")
    >>> type(plain["params"]["fc"]["kernel"]).__name__
    'ArrayImpl'
    """
    if name not in adapter_names(adapted):
        raise ValueError(f"no adapter named {name!r}; this tree has {list(adapter_names(adapted))}")

    def drop(leaf):
        if not is_node(leaf) or name not in leaf.names:
            return leaf
        return leaf.remove_adapter(name)

    out = jax.tree_util.tree_map(drop, adapted, is_leaf=is_adapter_leaf)
    for key in reserved_keys(out):   # shared parameters (tCURLoRA's cores) that no node uses now
        prune = _EXPANDERS[key][2]
        if prune is not None:
            out = prune(out)
    return out


def combine_adapters(adapted, weights: Mapping[str, float], method: str = "linear", name: str = "mix",
                     rank: int | None = None):
    """PEFT's ``add_weighted_adapter``: a new adapter ``name`` built from existing ones.

    - ``"linear"``: requires equal ranks; ``A = sum sqrt(w_i s_i) A_i``, ``B = sum sqrt(w_i s_i) B_i``
      (scale 1). Note this is not ``sum w_i dW_i`` (PEFT's semantics; cross terms appear).
    - ``"cat"``: concatenates along the rank: ``A = [w_i s_i A_i]``, ``B = [B_i]``, so
      ``dW = sum w_i dW_i`` exactly; rank = sum of ranks.
    - ``"svd"``: ``sum w_i dW_i`` truncated to ``rank`` (default max rank) by SVD.
    The new adapter is added (not activated); use :func:`activate`.

    rsLoRA sources: PEFT gives the combined adapter ``lora_alpha = r_new`` and the first source's
    ``use_rslora``, so its scaling is ``sqrt(r_new)``, not 1, and its delta is ``sqrt(r_new)`` times
    the one here (the same factors); jlora keeps scale 1, the weighted combination itself.

    Example:

    >>> import jax, jax.numpy as jnp, numpy as np, jlora
    >>> params = {"params": {"fc": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}}}
    >>> adapted = jlora.apply(params, jlora.LoRA(rank=2, targets="fc"), key=jax.random.key(0))
    >>> adapted = jlora.apply(adapted, jlora.LoRA(rank=1, targets="fc"), jax.random.key(1), name="other")
    >>> mixed = jlora.combine_adapters(adapted, {"default": 0.5, "other": 0.5}, method="cat", name="mix")
    >>> node = mixed["params"]["fc"]["kernel"]
    >>> node.meta["mix"].rank, node.active                 # added, not activated
    (3, ('default', 'other'))
    """
    if method not in ("linear", "cat", "svd"):
        raise ValueError(f"method must be 'linear', 'cat' or 'svd', got {method!r}")
    if not weights:
        raise ValueError("weights must name at least one adapter")
    known = adapter_names(adapted)
    for n, w in weights.items():
        if n not in known:
            raise ValueError(f"unknown adapter {n!r}; this tree has {list(known)}")
        if not isinstance(w, (int, float)):
            raise TypeError(f"weight for {n!r} must be a number, got {w!r}")
    if name in known:
        raise ValueError(f"an adapter named {name!r} already exists")

    def mix(leaf):
        if not is_node(leaf):
            return leaf
        present = [(n, w) for n, w in weights.items() if n in leaf.names]
        if not present:
            return leaf
        meta = leaf.meta
        odd = sorted({meta[n].method for n, _ in present if not leaf.states[n].additive})
        if odd:
            raise ValueError(f"combine_adapters mixes low-rank deltas only; {leaf.path!r} has {odd} adapters among "
                             f"{[n for n, _ in present]}, whose deltas are not additive (a magnitude or a scaling "
                             f"of W0, not s * A @ B)")
        fa, fb = {}, {}
        for n, _ in present:
            fa[n], fb[n] = leaf.factors(n)
        s = leaf.layout.stack
        if method == "linear":
            ranks = {meta[n].rank for n, _ in present}
            if len(ranks) != 1:
                raise ValueError(f"method='linear' needs equal ranks, got {ranks} at {leaf.path!r}; use 'cat' or 'svd'")
            a = sum(math.copysign(math.sqrt(abs(w) * meta[n].scale), w) * fa[n] for n, w in present)
            b = sum(math.sqrt(abs(w) * meta[n].scale) * fb[n] for n, w in present)
            r = ranks.pop()
        elif method == "cat":
            a = jnp.concatenate([w * meta[n].scale * fa[n] for n, w in present], axis=-1)
            b = jnp.concatenate([fb[n] for n, _ in present], axis=s)
            r = a.shape[-1]
        else:
            r = rank or max(meta[n].rank for n, _ in present)
            delta = sum(w * meta[n].scale * factor_product(fa[n], fb[n], leaf.layout) for n, w in present)
            stack, ins, outs = leaf.layout.split(leaf.shape)
            mat = delta.reshape(stack + (math.prod(ins), math.prod(outs))).astype(jnp.float32)
            u, sv, vh = jnp.linalg.svd(mat, full_matrices=False)
            r = min(r, sv.shape[-1])
            a = (u[..., :, :r] * sv[..., None, :r]).reshape(stack + ins + (r,))
            b = vh[..., :r, :].reshape(stack + (r,) + outs)
        new_meta = AdapterMeta(method="lora", rank=int(r), scale=1.0, dropout=0.0, init=f"combined-{method}")
        return leaf.add_adapter(name, LoRAState(a, b), new_meta, active=False)

    return jax.tree_util.tree_map(mix, adapted, is_leaf=is_adapter_leaf)


# ------------------------------------------------------------------------------------------
# summary

def _nbytes(x):
    return int(np.prod(np.shape(x))) * jnp.dtype(x.dtype).itemsize if x is not None else 0


def count(adapted) -> dict:
    """``{"trainable": n, "total": n, "trainable_bytes": b, "frozen_bytes": b}`` (a quantised base
    counts its logical parameters in ``total`` and its packed bytes in ``frozen_bytes``).

    Example:

    >>> import jax, jax.numpy as jnp, numpy as np, jlora
    >>> params = {"params": {"fc": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}}}
    >>> adapted = jlora.apply(params, jlora.LoRA(rank=2, targets="fc"), key=jax.random.key(0))
    >>> jlora.count(adapted)                               # A (4x2) + B (2x3) of the 15 + 14
    {'trainable': 14, 'total': 29, 'trainable_bytes': 56, 'frozen_bytes': 60}
    """
    trainable, frozen = partition(adapted)
    t_leaves = [x for x in jax.tree_util.tree_leaves(trainable) if _is_array(x)]
    f_items = jax.tree_util.tree_leaves(frozen, is_leaf=is_quantized)
    n_t = sum(int(np.prod(np.shape(x))) for x in t_leaves)
    n_f = sum(int(np.prod(x.shape)) for x in f_items if is_quantized(x) or _is_array(x))
    f_bytes = sum(x.nbytes if is_quantized(x) else _nbytes(x) for x in f_items if is_quantized(x) or _is_array(x))
    return {"trainable": n_t, "total": n_t + n_f, "trainable_bytes": sum(map(_nbytes, t_leaves)),
            "frozen_bytes": int(f_bytes)}


def summary(adapted, print_fn=None) -> str:
    """A table of adapted leaves: path, base shape, method, rank, trainable count, bytes,
    and the total trainable share. Returns the text (and prints it if ``print_fn``).

    Example:

    >>> import jax, jax.numpy as jnp, numpy as np, jlora
    >>> params = {"params": {"fc": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}}}
    >>> adapted = jlora.apply(params, jlora.LoRA(rank=2, targets="fc"), key=jax.random.key(0))
    >>> print(jlora.summary(adapted).splitlines()[2])
    params/fc/kernel  (4, 3)      lora    default:2  14         56
    """
    flat, _ = flatten_with_paths(adapted, is_leaf=is_adapter_leaf)
    shared = tuple(k + "/" for k in reserved_keys(adapted))   # listed by the method's own summary
    rows = []
    for path, leaf in flat:
        if shared and path.startswith(shared):
            continue
        if is_node(leaf):
            meta = leaf.meta
            own = [x for k in leaf.active for f, x in leaf.states[k].arrays().items()
                   if x is not None and f not in leaf.states[k].frozen]
            n = sum(int(np.prod(x.shape)) for x in own)
            nbytes = sum(_nbytes(x) for x in own)
            methods = ",".join(sorted({meta[k].method for k in leaf.names}))
            ranks = ",".join(f"{k}:{meta[k].rank}{'' if k in leaf.active else '(off)'}" for k in leaf.names)
            rows.append((path, str(leaf.shape), methods, ranks, f"{n:,}", f"{nbytes:,}"))
        elif isinstance(leaf, Trainable):
            rows.append((path, str(leaf.shape), "full", "-", f"{int(np.prod(leaf.shape)):,}", f"{_nbytes(leaf.value):,}"))
    head = ("path", "base shape", "method", "rank", "trainable", "bytes")
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
    fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths))
    c = count(adapted)
    pct = 100.0 * c["trainable"] / max(c["total"], 1)
    lines = [fmt(head), fmt(tuple("-" * w for w in widths))] + [fmt(r) for r in rows]
    for key in reserved_keys(adapted):
        if _EXPANDERS[key][1] is not None:
            lines.extend(_EXPANDERS[key][1](adapted))
    lines.append(f"trainable: {c['trainable']:,} / {c['total']:,} params ({pct:.4f}%), "
                 f"{c['trainable_bytes']:,} bytes trainable, {c['frozen_bytes']:,} bytes frozen")
    text = "\n".join(lines)
    if print_fn is not None:
        print_fn(text)
    return text
