"""One conformance table for every adapter method that goes through ``jlora.apply``.

Modelled on optax's ``contrib/_common_test.py`` and PEFT's ``TEST_CASES`` + ``testing_common.py``:
each method is one :class:`Row` of :data:`ROWS` (a spec factory, capability flags, tolerances) and
every check below is one test function parametrized over the rows, so a failure names the method
*and* the check (``test_unmerge_recovers_bases[QDoRA-nf4]``).

Checks (one test function each):

1. ``lift == merge``: the factored forward and the gradient w.r.t. the trainable half equal those
   of the merged model (:func:`assert_lift_matches_merge`, ``strict=True`` where the method is
   factored), every trainable array gets a gradient and the adapter is not a no-op.
2. No kernel-sized ``dot_general`` in the gradient's jaxpr (a negative control on the merged
   reference proves the detector sees them).
3. ``combine(*partition(t)) == t`` and the trainable half holds exactly the state's trainable fields.
4. ``unmerge(merge(t), t)`` recovers the bases (a quantised base's codes come back exactly).
5. ``save_adapter`` / ``load_adapter`` round trip; ``save_peft`` / ``load_peft`` round trip where the
   method has a PEFT form, else ``save_peft``'s refusal.
6. Several adapters: a second adapter ``"second"`` (where the method allows one; else the refusal),
   ``activate``, ``delete_adapter``; an exclusive method refuses another method on its kernels.
7. ``nn.scan`` + ``nn.remat`` stacked layers: ``lift == merge`` still holds.
8. Sharding on 8 fake CPU devices (one subprocess for all rows): each state array's sharding
   follows its base's (``a`` / ``b`` inherit the base's axes, vectors keep the stacked axes) and a
   jitted, sharded, lifted forward equals the unsharded one.

Adding a method = adding one :class:`Row` to :data:`ROWS`: a spec factory taking the :class:`Site`
of the model it is applied to (which kernels exist, which are "feed-forward", which form
same-shape groups) and the flags that say what the method can do. Every check then runs on it.

Prompt tuning, prefix tuning and P-tuning are not in the table: they do not adapt kernels through
``jlora.apply`` (they use ``jlora.apply_prompt`` and add virtual tokens, not weight deltas), so
none of these checks applies to them; they are covered by ``tests/methods/test_prompt*.py``.

The sharding worker lives in this file too: ``python -m tests.methods.test_conformance
--sharding-worker`` (run by :func:`test_sharding_follows_base` with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``) prints one JSON line per row.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time
import warnings
from typing import Any, Callable

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core as jcore

import jlora
from jlora.core.nodes import is_adapter_leaf
from jlora.core.paths import flatten_with_paths
from jlora.quant import QuantizedArray
from jlora.io.peft import default_naming

ROOT = pathlib.Path(__file__).resolve().parents[2]

# ---------------------------------------------------------------------------------------------
# models: tiny, with kernel sizes that no activation or factor shape can coincide with

D, H, BATCH, LAYERS = 24, 40, 6, 2   # kernels 24x40 and 40x40 (stacked: 2x40x40); activations 6x24, 6x40


class MLP(nn.Module):
    """Three Dense layers; ``mid_0`` / ``mid_1`` have the same shape (a tCURLoRA group) and
    ``up`` is not square (inputs and outputs cannot be mixed up unnoticed)."""

    @nn.compact
    def __call__(self, x):
        h = nn.gelu(nn.Dense(H, name="up")(x))
        h = h + nn.gelu(nn.Dense(H, name="mid_0")(h))
        return nn.Dense(H, name="mid_1")(h)


class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return x + nn.gelu(nn.Dense(H, name="fc")(x)), None


class Stacked(nn.Module):
    """``nn.scan`` over ``nn.remat`` blocks: one kernel of shape (LAYERS, H, H)."""

    @nn.compact
    def __call__(self, x):
        scan = nn.scan(nn.remat(Block), variable_axes={"params": 0}, split_rngs={"params": True}, length=LAYERS)
        x, _ = scan(name="blocks")(x, None)
        return x


@dataclasses.dataclass(frozen=True)
class Site:
    """What a spec factory needs to know about the model it adapts."""

    kernels: str                 # every adaptable kernel
    feedforward: str             # the kernels whose input an IA3 feed-forward adapter scales
    groups: tuple                # same-shape kernel groups (tCURLoRA), ((name, pattern), ...)


MLP_SITE = Site(r".*/kernel", r".*/mid_1/kernel", (("mid", r".*/mid_\d+/kernel"),))
STACK_SITE = Site(r".*/kernel", r".*/fc/kernel", (("fc", r".*/fc/kernel"),))


# ---------------------------------------------------------------------------------------------
# the table

@dataclasses.dataclass(frozen=True)
class Row:
    """One adapter method and what it can do.

    ``make(site)`` builds the spec. ``trainable_fields`` / ``frozen_fields``: the per-kernel state's
    arrays that train / stay frozen (``shared_trainable``: trainable leaves under a reserved
    top-level key instead, tCURLoRA).
    ``second(site)``: the spec of a second adapter on the same kernels (None: the method refuses
    one; ``second_refusal`` is the error's regex). ``can_share_kernel``: another method's adapter may
    sit on the same kernel (else ``jlora.apply`` refuses). ``has_peft_form``: PEFT files round-trip
    (else ``peft_refusal`` is ``save_peft``'s error; ``peft_bias_warning``: ``save_peft`` warns that
    PEFT would also scale the biases). ``factored``: ``lift`` runs it without forming a kernel-sized
    array (``strict=True``, no kernel-sized dot in the gradient; a row with ``factored=False``, e.g.
    tCURLoRA at a rank where ``lift``'s cheaper-path rule materialises, must show that dot instead).
    ``quantised``: the base is a ``QuantizedArray``. ``rewrites_base``: the init rewrites the base
    (PiSSA / OLoRA residuals). ``atol``: lift-vs-merge tolerance (bf16 compute needs more).
    """

    name: str
    make: Callable[[Site], Any]
    trainable_fields: tuple
    frozen_fields: tuple = ()
    second: Callable[[Site], Any] | None = None
    second_refusal: str = ""
    can_share_kernel: bool = True
    has_peft_form: bool = True
    peft_refusal: str = ""
    factored: bool = True
    quantised: bool = False
    rewrites_base: bool = False
    shared_trainable: tuple = ()
    peft_bias_warning: bool = False
    atol: float = 2e-5


def _lora(**kw):
    return lambda s: jlora.LoRA(rank=4, alpha=8, targets=s.kernels, **kw)


def _qlora(**kw):
    return lambda s: jlora.QLoRA(rank=4, alpha=8, targets=s.kernels, block=16, **kw)


def _dora(**kw):
    return lambda s: jlora.DoRA(rank=4, alpha=8, targets=s.kernels, **kw)


ROWS = [
    Row("LoRA", _lora(), ("a", "b"), second=_lora()),
    Row("rsLoRA", _lora(rslora=True), ("a", "b"), second=_lora(rslora=True)),
    Row("LoRA-PiSSA", _lora(init="pissa"), ("a", "b"), second=_lora(), rewrites_base=True,
        has_peft_form=False, peft_refusal="rewrote the base weight"),
    Row("LoRA-OLoRA", _lora(init="olora"), ("a", "b"), second=_lora(), rewrites_base=True,
        has_peft_form=False, peft_refusal="rewrote the base weight"),
    # the default bf16 compute dtype: merge rounds W0 + dW to bf16, lift adds dW in f32
    Row("QLoRA-nf4", _qlora(quant="nf4"), ("a", "b"), second=_lora(), quantised=True, atol=3e-2),
    Row("QLoRA-int4", _qlora(quant="int4", compute_dtype=jnp.float32), ("a", "b"), second=_lora(), quantised=True),
    Row("QLoRA-int8", _qlora(quant="int8", double_quant=False, compute_dtype=jnp.float32), ("a", "b"),
        second=_lora(), quantised=True),
    Row("DoRA", _dora(), ("a", "b", "m"), ("w0_sq",), second=_dora()),
    Row("QDoRA-nf4", lambda s: jlora.QDoRA(rank=4, alpha=8, targets=s.kernels, block=16, quant="nf4",
                                           compute_dtype=jnp.float32),
        ("a", "b", "m"), ("w0_sq",), second=_dora(), quantised=True),
    Row("IA3", lambda s: jlora.IA3(targets=s.kernels), ("l",), second=lambda s: jlora.IA3(targets=s.kernels),
        can_share_kernel=False, peft_bias_warning=True),
    Row("IA3-feedforward", lambda s: jlora.IA3(targets=s.kernels, feedforward=s.feedforward), ("l",),
        second=lambda s: jlora.IA3(targets=s.kernels, feedforward=s.feedforward), can_share_kernel=False,
        peft_bias_warning=True),
    Row("AdaLoRA", lambda s: jlora.AdaLoRA(init_r=4, target_r=2, total_steps=10, alpha=32, targets=s.kernels),
        ("a", "e", "b"), second=lambda s: jlora.AdaLoRA(init_r=3, target_r=2, total_steps=10, targets=s.kernels)),
    # n3 * r = 4 for 40x40 kernels: lift's cheaper-path rule keeps it factored
    Row("tCURLoRA", lambda s: jlora.TCURLoRA(rank=2, groups=dict(s.groups)), (), shared_trainable=("u_re", "u_im"),
        second=None, second_refusal="one tCURLoRA adapter per tree",
        has_peft_form=False, peft_refusal="'tcur' adapter"),
]
ROW = {r.name: r for r in ROWS}
by_row = pytest.mark.parametrize("row", ROWS, ids=list(ROW))


# ---------------------------------------------------------------------------------------------
# shared fixtures (built once, lazily: the sharding worker imports this module too)

@functools.cache
def _setup(stacked: bool = False):
    model = Stacked() if stacked else MLP()
    x = jax.random.normal(jax.random.key(1), (BATCH, H if stacked else D))
    params = model.init(jax.random.key(2), x)
    return model, params, x, (STACK_SITE if stacked else MLP_SITE)


def _apply(row, stacked=False, key=3):
    model, params, x, site = _setup(stacked)
    return jlora.apply(params, row.make(site), jax.random.key(key), model=model.apply, example=(x,))


@functools.cache
def _adapted(name: str, stacked: bool = False):
    """The row's adapter on the MLP (or the stacked model), every trainable array moved off its init."""
    return perturb_trainable(_apply(ROW[name], stacked))


def perturb_trainable(t, seed=7, scale=0.1, names=None):
    """Moves every trainable array (of the active adapters, or of the adapters ``names``) away from
    its init: ``v + scale * noise * (1 + |v|)``. LoRA's ``b`` (0), IA3's ``l`` (1), AdaLoRA's ``e``
    (0), DoRA's ``m`` (the norm) and tCURLoRA's cores (``U0``) all become non-trivial. Host-side
    NumPy noise, so no per-shape compiles."""
    rng = np.random.default_rng(seed)
    active = None
    if names is not None:   # only those train in the partition below; the active set is restored after
        active = tuple(dict.fromkeys(n for node in _nodes(t).values() for n in node.active))
        t = jlora.activate(t, names)
    trainable, frozen = jlora.partition(t)

    def move(v):
        v_np = np.asarray(v, np.float32)
        noise = rng.standard_normal(v_np.shape).astype(np.float32)
        return jnp.asarray(v_np + scale * noise * (1 + np.abs(v_np)), v.dtype)

    out = jlora.combine(jax.tree_util.tree_map(move, trainable), frozen)
    return out if active is None else jlora.activate(out, active)


def _nodes(tree):
    """``{path: AdaptedWeight}`` of a tree."""
    return {p: l for p, l in flatten_with_paths(tree, is_leaf=is_adapter_leaf)[0] if jlora.is_node(l)}


def _bare_quantised(tree):
    """Paths of ``QuantizedArray`` s standing as plain leaves, outside any adapted-weight node."""
    is_leaf = lambda l: is_adapter_leaf(l) or isinstance(l, QuantizedArray)  # noqa: E731
    return [p for p, l in flatten_with_paths(tree, is_leaf=is_leaf)[0] if isinstance(l, QuantizedArray)]


def _bases(tree):
    """The base model a tree carries: every node replaced by its (dequantised) base."""
    return jlora.merge(jlora.activate(tree, []))


@functools.cache
def _lifted(stacked=False, strict=True):
    """One lifted forward per model (``strict``: raise rather than materialise a kernel), so its
    per-structure trace cache is shared by the checks."""
    return jlora.lift(_setup(stacked)[0].apply, strict=strict)


@functools.cache
def _plain(stacked=False):
    return jax.jit(_setup(stacked)[0].apply)


def _close(a, b, atol, rtol=None):
    chex.assert_tree_all_finite((a, b))
    chex.assert_trees_all_close(a, b, atol=atol, rtol=atol if rtol is None else rtol)


# ---------------------------------------------------------------------------------------------
# 1. lift == merge (outputs and gradients)

def _loss(y):
    return jnp.mean(jnp.tanh(y.astype(jnp.float32))), y


def assert_lift_matches_merge(stacked, t, atol, strict=True):
    """The lifted forward and its gradient w.r.t. the trainable half equal those of the merged
    model: a chex version of ``tests/core/_helpers.assert_lift_matches_merge`` with output and
    gradient from one compiled program per side and the lifted function shared with the other
    checks (that helper's ``np.abs(y).max()`` cannot take the zero-size gradient of tCURLoRA's
    ``u_im`` for a two-kernel group)."""
    model, _, x, _ = _setup(stacked)
    lifted = _lifted(stacked, strict)
    trainable, frozen = jlora.partition(t)

    def grad_and_out(fwd):
        return jax.jit(jax.grad(lambda tr: _loss(fwd(jlora.combine(tr, frozen), x)), has_aux=True))(trainable)

    g, out = grad_and_out(lifted)
    g_ref, ref = grad_and_out(lambda p, x: model.apply(jlora.merge(p), x))
    assert out.dtype == ref.dtype, (out.dtype, ref.dtype)
    chex.assert_shape([out, ref], (BATCH, H))
    _close(out, ref, atol)
    chex.assert_trees_all_equal_structs(g, g_ref)
    chex.assert_trees_all_equal_shapes_and_dtypes(g, trainable)
    leaves = [np.asarray(v) for v in jax.tree_util.tree_leaves(g_ref)]
    assert leaves and all(np.any(v != 0) for v in leaves if v.size), "a trainable array gets no gradient"
    scale = max([1.0] + [float(np.abs(v).max()) for v in leaves if v.size])
    _close(g, g_ref, atol * scale, rtol=1e-4)
    # the adapter is not a no-op (else the comparison says nothing)
    base_out = _plain(stacked)(_bases(t), x)
    assert float(jnp.max(jnp.abs(out - base_out))) > 1e-3
    return out


@by_row
def test_lift_equals_merge(row):
    t = _adapted(row.name)
    out = assert_lift_matches_merge(False, t, row.atol, strict=row.factored)
    # the plain (not differentiated) lifted call agrees, and is finite
    _close(_lifted(False, row.factored)(t, _setup()[2]), out, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# 2. no kernel-sized dot_general in the gradient

def _equations(jaxpr):
    """Every equation of ``jaxpr`` and of the jaxprs nested in it (jit, scan, remat, cond, ...)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in (value if isinstance(value, (tuple, list)) else (value,)):
                if isinstance(sub, jcore.ClosedJaxpr):
                    yield from _equations(sub.jaxpr)
                elif isinstance(sub, jcore.Jaxpr):
                    yield from _equations(sub)


def _kernel_sized_dots(jaxpr, sizes):
    """Output shapes of the ``dot_general`` s whose result has a kernel's size (either orientation)."""
    return [tuple(v.aval.shape) for eqn in _equations(jaxpr) if eqn.primitive.name == "dot_general"
            for v in eqn.outvars if len(v.aval.shape) >= 2 and int(np.prod(v.aval.shape)) in sizes]


@by_row
def test_gradient_has_no_kernel_sized_dot(row):
    model, _, x, _ = _setup()
    t = _adapted(row.name)
    sizes = {int(np.prod(n.shape)) for n in _nodes(t).values()}
    assert sizes and not sizes & {BATCH * D, BATCH * H}       # activations cannot pass for kernels
    trainable, frozen = jlora.partition(t)
    lifted = _lifted(False, row.factored)

    def jaxpr_of(fn):
        loss = lambda tr: jnp.mean(fn(jlora.combine(tr, frozen), x) ** 2)
        return jax.make_jaxpr(jax.grad(loss))(trainable).jaxpr

    found = _kernel_sized_dots(jaxpr_of(lifted), sizes)
    if row.factored:
        assert found == [], f"{row.name}: kernel-sized dot_general outputs {found}"
    else:
        assert found, f"{row.name} declares a dense path but none was found"
    # negative control: the materialising reference forms kernel-sized weight gradients
    assert _kernel_sized_dots(jaxpr_of(lambda p, x: model.apply(jlora.merge(p), x)), sizes)


# ---------------------------------------------------------------------------------------------
# 3. partition / combine

@by_row
def test_partition_combine(row):
    t = _adapted(row.name)
    trainable, frozen = jlora.partition(t)
    back = jlora.combine(trainable, frozen)
    chex.assert_trees_all_equal_structs(back, t)
    chex.assert_trees_all_equal(back, t)
    nodes_t, nodes_f = _nodes(trainable), _nodes(frozen)
    assert nodes_t and set(nodes_t) == set(nodes_f) == set(_nodes(t))
    for path, node in _nodes(t).items():
        state = node.states["default"]
        half_t, half_f = nodes_t[path].states["default"], nodes_f[path].states["default"]
        assert nodes_t[path].base is None and nodes_f[path].base is not None, path
        trained = {k for k, v in half_t.arrays().items() if v is not None}
        kept = {k for k, v in half_f.arrays().items() if v is not None}
        # exactly the state's (and the row's) trainable fields train; every other array is frozen
        present = {k for k, v in state.arrays().items() if v is not None}
        assert present & set(state.trainable_fields()) == set(row.trainable_fields), (path, present)
        assert trained == set(row.trainable_fields), (path, trained)
        assert kept == present - trained == set(row.frozen_fields), (path, kept)
    # shared (reserved-key) trainable leaves: exactly the declared ones
    flat_t = [p for p, v in flatten_with_paths(trainable, is_leaf=is_adapter_leaf)[0]
              if v is not None and not jlora.is_node(v)]
    assert sorted({p.rsplit("/", 1)[-1] for p in flat_t}) == sorted(row.shared_trainable), flat_t
    for leaf in jax.tree_util.tree_leaves(trainable):
        assert jnp.issubdtype(leaf.dtype, jnp.floating), leaf.dtype


# ---------------------------------------------------------------------------------------------
# 4. unmerge(merge(t), t) recovers the bases

@by_row
def test_unmerge_recovers_bases(row):
    t = _adapted(row.name)
    merged = jlora.merge(t)
    assert not _nodes(merged) and not _bare_quantised(merged)
    back = jlora.unmerge(merged, t)
    chex.assert_trees_all_equal_structs(back, t)
    _close(back, t, atol=1e-5)      # bases, states, biases and any shared (reserved-key) parameters
    nodes, again = _nodes(t), _nodes(back)
    assert nodes and set(nodes) == set(again)
    for path, node in nodes.items():
        assert again[path].quantized == node.quantized == row.quantised
        if row.quantised:          # the codes, bit for bit
            chex.assert_trees_all_equal(again[path].base, node.base)


# ---------------------------------------------------------------------------------------------
# 5. save_adapter / load_adapter and save_peft / load_peft

@by_row
def test_save_load_round_trip(row, tmp_path):
    model, params, x, site = _setup()
    t = _adapted(row.name)
    spec = row.make(site)
    jlora.io.save_adapter(tmp_path / "adapter", t, spec=spec)
    # a quantised base is not saved: reload onto a tree quantised the same way (another key)
    onto = _apply(row, key=4) if row.quantised else params
    loaded = jlora.io.load_adapter(tmp_path / "adapter", onto)
    chex.assert_trees_all_equal_structs(loaded, t)
    chex.assert_trees_all_equal(loaded, t)
    lifted = _lifted(False, row.factored)
    chex.assert_trees_all_equal(lifted(loaded, x), lifted(t, x))


@by_row
def test_peft_round_trip(row, tmp_path):
    model, params, x, _ = _setup()
    t = _adapted(row.name)
    if not row.has_peft_form:
        with pytest.raises(ValueError, match=row.peft_refusal):
            jlora.io.save_peft(tmp_path / "peft", t, default_naming)
        assert not (tmp_path / "peft").exists()
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        jlora.io.save_peft(tmp_path / "peft", t, default_naming)
    bias_warned = any("scales the bias" in str(w.message) for w in caught)
    assert bias_warned == row.peft_bias_warning, [str(w.message) for w in caught]
    # PEFT files hold no quantised base: a QLoRA / QDoRA file loads as LoRA / DoRA on the dequantised base
    onto = _bases(t)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = jlora.io.load_peft(tmp_path / "peft", onto, default_naming)
    assert set(_nodes(loaded)) == set(_nodes(t))
    for path, node in _nodes(t).items():
        got, meta = _nodes(loaded)[path].states["default"], _nodes(loaded)[path].meta["default"]
        want = node.meta["default"]
        assert type(got) is type(node.states["default"]), (path, type(got))
        assert (meta.rank, meta.feedforward) == (want.rank, want.feedforward), (path, meta, want)
        assert meta.scale == pytest.approx(want.scale, rel=1e-6), (path, meta, want)
        for k in row.trainable_fields:
            _close(getattr(got, k), getattr(node.states["default"], k), atol=1e-6)
    lifted = _lifted(False, row.factored)
    _close(lifted(loaded, x), lifted(t, x), atol=row.atol)


# ---------------------------------------------------------------------------------------------
# 6. several adapters: activate / delete_adapter

@by_row
def test_activate_and_delete(row):
    model, params, x, site = _setup()
    t = _adapted(row.name)
    lifted, plain = _lifted(False, row.factored), _plain()
    base_out = plain(_bases(t), x)
    if not (row.quantised or row.rewrites_base):
        _close(base_out, plain(params, x), atol=1e-6)     # the base model is the original one
    one_out = lifted(t, x)
    # activate([]) runs the base model (row.atol: a bf16-compute base is merged to bf16, lifted in f32)
    tol = max(row.atol, 1e-5)
    _close(lifted(jlora.activate(t, []), x), base_out, atol=tol)
    # another method on the same kernels: allowed unless the method is exclusive
    other = jlora.LoRA(rank=2, alpha=4, targets=site.kernels)
    if row.can_share_kernel:
        mixed = jlora.apply(t, other, jax.random.key(5), name="other")
        assert set(jlora.adapter_names(mixed)) == {"default", "other"}
    else:
        with pytest.raises(ValueError, match="cannot be combined"):
            jlora.apply(t, other, jax.random.key(5), name="other")
    # a second adapter of the method: both run, activate picks, delete_adapter gives the first back
    if row.second is None:
        with pytest.raises(ValueError, match=row.second_refusal):
            jlora.apply(t, row.make(site), jax.random.key(5), name="second", model=model.apply, example=(x,))
    else:
        two = jlora.apply(t, row.second(site), jax.random.key(5), name="second", model=model.apply, example=(x,))
        two = perturb_trainable(two, seed=11, names=["second"])
        assert jlora.adapter_names(two) == ("default", "second")
        assert all(n.active == ("default", "second") for n in _nodes(two).values())
        both_out = lifted(two, x)
        _close(both_out, plain(jlora.merge(two), x), atol=row.atol)
        assert float(jnp.max(jnp.abs(both_out - one_out))) > 1e-3       # the second adapter does something
        _close(lifted(jlora.activate(two, ["default"]), x), one_out, atol=1e-6)
        back = jlora.delete_adapter(two, "second")
        chex.assert_trees_all_equal_structs(back, t)
        chex.assert_trees_all_equal(back, t)
    # deleting the only adapter: the base model, with nothing left to train
    none = jlora.delete_adapter(t, "default")
    assert jlora.adapter_names(none) == ()
    bare = _bare_quantised(none)   # neither lift nor merge can run a QuantizedArray outside a node
    assert not bare, f"delete_adapter left bare QuantizedArrays (no model can use them) at {bare}"
    left = [p for p, _ in flatten_with_paths(jlora.partition(none)[0])[0]]     # the arrays, inside nodes too
    assert not left, f"delete_adapter left trainable arrays behind: {left}"
    if not row.quantised:      # a dense base goes back to a plain leaf: the plain params the tree carried
        chex.assert_trees_all_equal(none, _bases(t))
    _close(lifted(none, x), base_out, atol=tol)


# ---------------------------------------------------------------------------------------------
# 7. scan + remat stacked layers

@by_row
def test_scan_remat_lift_equals_merge(row):
    t = _adapted(row.name, stacked=True)
    nodes = _nodes(t)
    assert nodes and all(n.layout.stack == 1 and n.shape[0] == LAYERS for n in nodes.values())
    # the lifted program keeps the layers stacked: still a scan over a remat'ed body
    x = _setup(stacked=True)[2]
    prims = {e.primitive.name for e in _equations(jax.make_jaxpr(_lifted(True, row.factored))(t, x).jaxpr)}
    assert "scan" in prims and prims & {"checkpoint", "remat2", "remat"}, sorted(prims)
    assert_lift_matches_merge(True, t, row.atol, strict=row.factored)


# ---------------------------------------------------------------------------------------------
# 8. sharding inheritance on 8 fake CPU devices (one subprocess for every row)

SHARD_SPEC = ("data", "fsdp", "tp")     # the stacked kernel (LAYERS, H, H): layers, inputs, outputs


def _expected_spec(field, base_spec, layout):
    """What ``field`` of a state should be sharded as, given its base's spec: a / b inherit the
    base's input / output axes (rank replicated), every other array keeps the stacked axes only."""
    s, i = layout.stack, layout.stack + layout.inputs
    entries = tuple(base_spec) + (None,) * (layout.ndim - len(tuple(base_spec)))
    if field == "a":
        return entries[:i] + (None,)
    if field == "b":
        return entries[:s] + (None,) + entries[i:]
    return entries[:s]


def _sharding_worker():
    """Runs in a fresh interpreter with 8 fake CPU devices; prints ``ROW <json>`` per row."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from jlora.distributed import make_mesh, shardings_for

    assert len(jax.devices()) == 8, jax.devices()
    mesh = make_mesh((2, 2, 2), ("data", "fsdp", "tp"))
    base_spec = P(*SHARD_SPEC)
    rules = [(r"fc/kernel$", base_spec)]
    _, _, x, _ = _setup(stacked=True)
    for row in ROWS:
        result = {"row": row.name, "problems": [], "checked": []}
        try:
            lifted = _lifted(True, row.factored)
            t = _adapted(row.name, stacked=True)
            ref = np.asarray(lifted(t, x))
            placed = jax.device_put(t, shardings_for(t, mesh, rules))
            for path, node in _nodes(placed).items():
                arrays = {} if node.quantized else {"base": node.base}
                arrays.update({f"{field}/{name}": v for name, state in node.states.items()
                               for field, v in state.arrays().items() if v is not None})
                for key, v in arrays.items():
                    field = key.split("/")[0]
                    want = base_spec if field == "base" else P(*_expected_spec(field, base_spec, node.layout))
                    result["checked"].append(key)
                    if not v.sharding.is_equivalent_to(NamedSharding(mesh, want), v.ndim):
                        result["problems"].append(f"{path}/{key}: sharded {v.sharding.spec}, expected {want}")
            out = np.asarray(jax.jit(lifted)(placed, x))
            result["max_diff"] = float(np.max(np.abs(out - ref)))
            result["scale"] = float(np.max(np.abs(ref)))
        except Exception as e:  # noqa: BLE001 - reported per row to the parent test
            result["error"] = f"{type(e).__name__}: {str(e)[:1500]}"
        print("ROW " + json.dumps(result), flush=True)


_WORKER: dict = {}
WORKER_TIMEOUT = 300


def _start_worker():
    """Starts the sharding worker once (in the background: it overlaps the other checks)."""
    if "proc" not in _WORKER:
        flags = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
        env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu",
               "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        _WORKER["out"], _WORKER["err"] = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        _WORKER["started"] = time.monotonic()
        _WORKER["proc"] = subprocess.Popen(
            [sys.executable, "-m", "tests.methods.test_conformance", "--sharding-worker"],
            env=env, cwd=ROOT, stdout=_WORKER["out"], stderr=_WORKER["err"], text=True)
    return _WORKER


@pytest.fixture(scope="module", autouse=True)
def _sharding_worker_in_background(request):
    if any(getattr(item, "originalname", "") == "test_sharding_follows_base" for item in request.session.items):
        _start_worker()
    yield
    proc = _WORKER.pop("proc", None)
    if proc is not None and proc.poll() is None:   # e.g. after -x stopped the run early
        proc.kill()
        proc.wait()
    for name in ("out", "err"):
        if name in _WORKER:
            _WORKER.pop(name).close()


@pytest.fixture(scope="module")
def sharding_results():
    worker = _start_worker()
    proc = worker["proc"]
    left = WORKER_TIMEOUT - (time.monotonic() - worker["started"])
    try:
        proc.wait(timeout=max(left, 1))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    worker["out"].seek(0)
    worker["err"].seek(0)
    stdout, stderr = worker["out"].read(), worker["err"].read()
    rows = {}
    for line in stdout.splitlines():
        if line.startswith("ROW "):
            r = json.loads(line[4:])
            rows[r["row"]] = r
    return proc.returncode, stdout, stderr, rows


@by_row
def test_sharding_follows_base(row, sharding_results):
    rc, stdout, stderr, rows = sharding_results
    assert row.name in rows, f"worker rc={rc} (timeout {WORKER_TIMEOUT} s)\n{stdout[-2000:]}\n{stderr[-4000:]}"
    r = rows[row.name]
    assert "error" not in r, r.get("error")
    assert r["problems"] == [], r["problems"]
    # every state array was checked (tCURLoRA's nodes hold none: their factors come from the shared cores)
    fields = {k.split("/")[0] for k in r["checked"]}
    assert fields == (set() if row.quantised else {"base"}) | set(row.trainable_fields) | set(row.frozen_fields), r
    assert r["max_diff"] <= 1e-5 * max(1.0, r["scale"]), r       # the same program, sharded


if __name__ == "__main__" and "--sharding-worker" in sys.argv:
    _sharding_worker()
