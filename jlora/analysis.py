"""What did the adapter learn? The analysis of the LoRA paper (Hu et al. 2021, §7) for any
low-rank adapter in jlora: the spectrum of the weight update, how similar two runs' subspaces are,
and how much the update amplifies directions the frozen weight already had.

For every adapted weight (an :class:`jlora.core.nodes.AdaptedWeight`; stacked / scanned layers
split into one matrix per layer, multi-axis kernels flattened by the node's :class:`Layout`):

* :func:`delta_weights`: ``ΔW = W_merged - W0`` as a ``(d_in, d_out)`` float64 matrix;
  :func:`factors`: the adapter's ``a`` factor ``(d_in, r)`` where it has one.
* :func:`spectrum`, :func:`effective_rank` (entropy, Roy & Vetterli 2007), :func:`stable_rank`,
  :func:`energy_rank`: how many directions ΔW really uses (the paper's "ΔW has a very low
  intrinsic rank").
* :func:`subspace_similarity` / :func:`similarity_grid`: the paper's
  ``φ(A1, A2, i, j) = ||U1[:, :i]^T U2[:, :j]||_F^2 / min(i, j)`` (its Fig. 3 / 4): 1 when the top
  ``i`` directions of one factor contain the top ``j`` of the other, 0 when they are orthogonal.
* :func:`amplification`: the paper's Table 7, ``||ΔW||_F / ||U^T W V^T||_F`` with U, V the top-r
  singular vectors of ΔW, beside W projected on its own top-r directions and on random ones.
* :func:`analyze` puts it all in one JSON-able report, :func:`plot` draws it (PNG, Agg backend).

Conventions. jlora (Flax) stores a kernel as ``(d_in, d_out)`` and its factors as ``a: (d_in, r)``,
``b: (r, d_out)``; the paper (and PyTorch) write ``W: (d_out, d_in)``, ``ΔW = B A`` with
``A: (r, d_in)``, PEFT's ``lora_A``. Everything here takes jlora's layout: ``a`` is the paper's
``A^T``, and the paper's "right-singular vectors of A" are the left singular vectors of ``a``. The
projection norm ``||U^T W V||_F`` is the same in either layout as long as W and ΔW share it (the
transpose swaps U and V and transposes the small ``r x r`` matrix), see :func:`amplification`.

All maths is NumPy float64 (the adapter arrays are read back from JAX in float32 or wider).

Example:

>>> import jax, jax.numpy as jnp, numpy as np, jlora
>>> from jlora import analysis
>>> params = {"params": {"fc": {"kernel": jnp.ones((8, 6))}}}
>>> adapted = jlora.apply(params, jlora.LoRA(rank=2, targets="fc"), key=0)
>>> node = adapted["params"]["fc"]["kernel"]
>>> adapted["params"]["fc"]["kernel"] = node.with_(states={"default": node.states["default"].replace(
...     b=jnp.ones((2, 6)))})
>>> dw = analysis.delta_weights(adapted)["params/fc/kernel"]
>>> dw.shape, int(np.linalg.matrix_rank(dw))
((8, 6), 1)
>>> round(analysis.effective_rank(np.array([3.0, 3.0, 3.0, 0.0])), 6)
3.0
"""

from __future__ import annotations

import math
import pathlib
import re
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

from jlora.core.api import expand
from jlora.core.nodes import dense, is_adapter_leaf, is_node
from jlora.core.paths import flatten_with_paths
from jlora.core.state import rewrites_base

__all__ = ["delta_weights", "factors", "spectrum", "effective_rank", "stable_rank", "energy_rank",
           "subspace_similarity", "similarity_grid", "amplification", "analyze", "plot"]

#: singular values kept per layer in :func:`analyze`'s report
TOP_SINGULAR = 32


# ------------------------------------------------------------------------------------------
# reading ΔW and the factors out of an adapted tree

def _nodes(adapted) -> list:
    """``[(path, node)]`` for every adapted weight with at least one active adapter (shared
    parameters, e.g. tCURLoRA's cores, expanded into per-node factors first)."""
    flat, _ = flatten_with_paths(expand(adapted), is_leaf=is_adapter_leaf)
    return [(path, leaf) for path, leaf in flat if is_node(leaf) and leaf.active]


def _layer_key(path: str, index: tuple) -> str:
    return path if not index else f"{path}[layer {','.join(map(str, index))}]"


def _per_layer(path: str, x: np.ndarray, n_stack: int, rows: int) -> dict:
    """``{key: 2-D matrix}`` of a ``stack + ... `` array: one ``(rows, -1)`` matrix per stacked layer."""
    stack = x.shape[:n_stack]
    x = x.reshape(stack + (rows, -1))
    return {_layer_key(path, idx): x[idx] for idx in np.ndindex(*stack)}


def _base_lookup(base_params) -> dict:
    if base_params is None:
        return {}
    flat, _ = flatten_with_paths(base_params, is_leaf=is_adapter_leaf)
    out = {}
    for path, leaf in flat:
        if is_node(leaf):   # an adapted tree given as the base: its own frozen weights
            leaf = dense(leaf.base, jnp.float32)
        elif hasattr(leaf, "value") and is_adapter_leaf(leaf):
            leaf = leaf.value
        out[path] = leaf
    return out


def _w0(path: str, node, base: Mapping):
    """The dense original weight of ``node`` (float64, the node's full shape): ``base[path]`` when
    given, else the node's own frozen base (dequantised)."""
    if path in base:
        w0 = np.asarray(base[path], np.float64)
        if w0.shape != node.shape:
            raise ValueError(f"base_params[{path!r}] has shape {w0.shape}, but the adapted weight there has "
                             f"shape {node.shape}: pass the parameters the adapter was applied to")
        return w0
    if base:
        raise ValueError(f"base_params has no weight at {path!r} (an adapted path); pass the parameters the "
                         f"adapter was applied to")
    return np.asarray(dense(node.base, jnp.float32), np.float64)


def _delta(path: str, node, base: Mapping) -> np.ndarray:
    """ΔW of one node in its own shape, float64."""
    if path in base:
        return np.asarray(node.materialize(jnp.float32), np.float64) - _w0(path, node, base)
    if base:
        _w0(path, node, base)   # raises: the path is missing
    # W_adapted - W0 without forming the sum: for an additive adapter this is exactly s * a @ b,
    # free of the rounding of (W0 + s a b) - W0 in the base's dtype
    return np.asarray(node.delta(dtype=jnp.float32), np.float64)


def _rows(node) -> int:
    _, inputs, _ = node.layout.split(node.shape)
    return int(np.prod(inputs, dtype=np.int64))


def delta_weights(adapted, base_params=None) -> dict:
    """``{key: ΔW}``: the weight update of every adapted leaf as a float64 ``(d_in, d_out)`` matrix.

    ``ΔW = W_merged - W0``, i.e. what :func:`jlora.merge` adds to each weight (computed per node as
    :meth:`AdaptedWeight.delta`, which is the same quantity without the cancellation of subtracting
    two large numbers in the base's dtype). ``W0`` is the node's frozen ``base`` (dequantised when it
    is quantised, QLoRA) unless ``base_params`` (the parameters the adapter was applied to) is given:
    then ``ΔW = W_merged - base_params[path]``. Pass it for PiSSA / OLoRA, whose frozen base is a
    residual ``W - s A0 B0``, to get the update from the pretrained W rather than ``s A B``.

    Keys are the paths :func:`jlora.summary` prints (``params/encoder/layer_0/query/kernel``). A
    stacked (scanned) kernel, ``layout.stack > 0``, is split into one matrix per layer, keyed
    ``"<path>[layer 3]"`` (``[layer 1,2]`` for two stacked axes). A multi-axis kernel (an attention
    kernel ``(d, heads, head_dim)``) is flattened by its layout into ``(prod(inputs), prod(outputs))``.
    """
    base = _base_lookup(base_params)
    out = {}
    for path, node in _nodes(adapted):
        out.update(_per_layer(path, _delta(path, node, base), node.layout.stack, _rows(node)))
    return out


def _node_factor(node):
    """The concatenated ``a`` factors of ``node``'s active low-rank adapters (its own shape
    ``stack + inputs + (r,)``), or None when none has one (IA3)."""
    found = [np.asarray(a, np.float64) for _, a, _, _ in node.active_factors()]
    if not found:
        return None
    return np.concatenate(found, axis=-1)


def _drop_zero_columns(a: np.ndarray) -> np.ndarray:
    keep = np.any(a != 0, axis=0)
    return a[:, keep] if not keep.all() else a


def factors(adapted) -> dict:
    """``{key: a}``: the adapter's ``a`` factor of every adapted leaf that has one, as a float64
    ``(d_in, r)`` matrix (keys and per-layer split as in :func:`delta_weights`), for
    :func:`subspace_similarity`.

    ``a`` is what each adapter state gives as its low-rank term (``LoRAState.a`` for LoRA, rsLoRA,
    PiSSA, OLoRA, QLoRA, DoRA and expanded tCURLoRA; AdaLoRA's ``a * e``). Several active adapters on
    one leaf are concatenated along the rank axis (their joint input subspace); all-zero columns
    (AdaLoRA's pruned triplets) are dropped, so ``r`` is the rank actually in use. Leaves whose
    adapters have no low-rank term (IA3) are left out.
    """
    out = {}
    for path, node in _nodes(adapted):
        a = _node_factor(node)
        if a is None:
            continue
        for key, m in _per_layer(path, a, node.layout.stack, _rows(node)).items():
            out[key] = _drop_zero_columns(m)
    return out


# ------------------------------------------------------------------------------------------
# spectrum and ranks

def _matrix(x, what: str) -> np.ndarray:
    x = np.asarray(x, np.float64)
    if x.ndim != 2 or 0 in x.shape:
        raise ValueError(f"{what} must be a non-empty 2-D matrix, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{what} holds non-finite values (nan / inf)")
    return x


def _singular_values(x, what: str) -> np.ndarray:
    """Singular values from a 1-D spectrum (checked) or a 2-D matrix (computed), descending."""
    x = np.asarray(x, np.float64)
    if x.ndim == 2:
        return spectrum(x)
    if x.ndim != 1 or np.any(x < 0) or not np.all(np.isfinite(x)):
        raise ValueError(f"{what} takes a 2-D matrix or a 1-D array of non-negative singular values, got "
                         f"shape {x.shape}" + (" with negative or non-finite entries" if x.ndim == 1 else ""))
    return np.sort(x)[::-1]


def spectrum(dw) -> np.ndarray:
    """The singular values of ``dw`` (2-D), float64, descending."""
    return np.linalg.svd(_matrix(dw, "spectrum's input"), compute_uv=False)


def effective_rank(s) -> float:
    """The entropy effective rank ``exp(H(p))``, ``p = s / sum(s)`` (Roy & Vetterli 2007) of the
    singular values ``s`` (or of a 2-D matrix): ``k`` for ``k`` equal non-zero singular values, and
    between 1 and ``k`` otherwise, smoothly counting how evenly the update spreads over directions.
    0 for an all-zero update."""
    s = _singular_values(s, "effective_rank")
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s[s > 0] / total
    return float(np.exp(-np.sum(p * np.log(p))))


def stable_rank(s) -> float:
    """``||ΔW||_F^2 / ||ΔW||_2^2 = sum(s^2) / max(s)^2`` of the singular values ``s`` (or of a 2-D
    matrix): at most the rank, insensitive to tiny singular values. 0 for an all-zero update."""
    s = _singular_values(s, "stable_rank")
    if s.size == 0 or s[0] <= 0:
        return 0.0
    return float(np.sum(s ** 2) / s[0] ** 2)


def energy_rank(s, fraction: float = 0.9) -> int:
    """The number of leading singular values holding ``fraction`` of ``||ΔW||_F^2 = sum(s^2)``
    (``s`` singular values or a 2-D matrix). 0 for an all-zero update."""
    if not 0 < fraction <= 1:
        raise ValueError(f"energy_rank's fraction must be in (0, 1], got {fraction!r}")
    s = _singular_values(s, "energy_rank")
    energy = np.cumsum(s ** 2)
    if energy.size == 0 or energy[-1] <= 0:
        return 0
    return int(np.searchsorted(energy / energy[-1], fraction * (1 - 1e-12)) + 1)


# ------------------------------------------------------------------------------------------
# subspace similarity (the paper's φ, §7.2)

def _left_vectors(a, what: str) -> np.ndarray:
    a = _matrix(a, what)
    u, _, _ = np.linalg.svd(a, full_matrices=False)
    return u


def _overlap(a1, a2) -> np.ndarray:
    if np.shape(a1)[0] != np.shape(a2)[0]:
        raise ValueError(f"the factors span different spaces: a1 has {np.shape(a1)[0]} rows (d_in), a2 has "
                         f"{np.shape(a2)[0]}; both must be jlora's (d_in, r) ``a`` factors of the same weight "
                         f"(PEFT's (r, d_in) lora_A: pass its transpose)")
    return _left_vectors(a1, "a1").T @ _left_vectors(a2, "a2")


def subspace_similarity(a1, a2, i: int, j: int) -> float:
    """The paper's normalised subspace similarity
    ``φ(A1, A2, i, j) = ||U1[:, :i]^T U2[:, :j]||_F^2 / min(i, j)`` in ``[0, 1]``.

    ``a1`` / ``a2`` are jlora ``a`` factors, ``(d_in, r1)`` and ``(d_in, r2)``, and ``U1`` / ``U2``
    their left singular vectors (columns, by decreasing singular value). In the paper's and PEFT's
    ``(r, d_in)`` layout (``A``, ``lora_A``) these are the *right* singular vectors of ``A``: the same
    subspace. 1 when the top-``i`` directions of one contain the top-``j`` of the other, 0 when they
    are orthogonal; ``φ(A, A, i, j) == φ(A, A, j, i)``. ``1 <= i <= min(d_in, r1)``, likewise ``j``.
    """
    m = _overlap(a1, a2)
    for name, v, n in (("i", i, m.shape[0]), ("j", j, m.shape[1])):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or not 1 <= v <= n:
            raise ValueError(f"subspace_similarity's {name} must be an int in [1, {n}] (the factor's rank), "
                             f"got {v!r}")
    return float(np.sum(m[:i, :j] ** 2) / min(i, j))


def similarity_grid(a1, a2) -> np.ndarray:
    """``grid[i - 1, j - 1] = φ(a1, a2, i, j)`` for ``i`` in ``1..r1``, ``j`` in ``1..r2``: the
    ``(r1, r2)`` heat map of the paper's Fig. 3 (``a1`` / ``a2`` as in :func:`subspace_similarity`)."""
    m = _overlap(a1, a2)
    cum = np.cumsum(np.cumsum(m ** 2, axis=0), axis=1)
    i = np.arange(1, m.shape[0] + 1)[:, None]
    j = np.arange(1, m.shape[1] + 1)[None, :]
    return cum / np.minimum(i, j)


# ------------------------------------------------------------------------------------------
# amplification (the paper's Table 7, §7.3)

def _orthonormal(rng, n: int, r: int) -> np.ndarray:
    q, _ = np.linalg.qr(rng.standard_normal((n, r)))
    return q


def amplification(w, dw, r: int, *, seed: int = 0, random_trials: int = 10) -> dict:
    """How much ΔW amplifies directions of W: the paper's Table 7 for one weight.

    With ``U`` / ``V`` the top-``r`` left / right singular vectors of ``dw``, ``W`` is projected on
    ΔW's subspace, ``||U^T W V||_F``, and compared with its projection on its own top-``r``
    directions (``sqrt(sum of W's top-r squared singular values)``) and on random orthonormal
    ``r``-dim subspaces (mean over ``random_trials``, seeded). The amplification factor is
    ``||ΔW||_F / ||U^T W V||_F``: large when ΔW boosts directions W hardly uses (the paper: about
    21.5 for r=4 on GPT-3's W_q).

    ``w`` and ``dw`` share a layout, jlora's ``(d_in, d_out)``, so U spans the input space and V the
    output space; the paper writes ``U^T W V^T`` for ``(d_out, d_in)`` matrices (U in the output
    space, ``V^T`` with right singular vectors as rows). Transposing both W and ΔW swaps U and V and
    transposes the ``r x r`` projection, so every norm here equals the paper's.

    Returns ``{"r", "dw_norm", "w_norm", "proj_dw", "proj_w", "proj_random", "proj_random_std",
    "amplification"}`` (``proj_*`` are ``||U^T W V||_F`` for ΔW's, W's own and random directions;
    ``amplification`` is nan when ΔW is zero).
    """
    w, dw = _matrix(w, "amplification's w"), _matrix(dw, "amplification's dw")
    if w.shape != dw.shape:
        raise ValueError(f"amplification's w {w.shape} and dw {dw.shape} must have the same shape "
                         f"(both jlora's (d_in, d_out))")
    limit = min(w.shape)
    if not isinstance(r, (int, np.integer)) or isinstance(r, bool) or not 1 <= r <= limit:
        raise ValueError(f"amplification's r must be an int in [1, {limit}] (min of {w.shape}), got {r!r}")
    if not isinstance(random_trials, int) or random_trials < 1:
        raise ValueError(f"random_trials must be a positive int, got {random_trials!r}")
    r = int(r)
    u, s, vt = np.linalg.svd(dw, full_matrices=False)
    dw_norm = float(np.sqrt(np.sum(s ** 2)))
    proj_dw = float(np.linalg.norm(u[:, :r].T @ w @ vt[:r].T))
    sw = np.linalg.svd(w, compute_uv=False)
    proj_w = float(np.sqrt(np.sum(sw[:r] ** 2)))
    rng = np.random.default_rng(seed)
    rand = np.array([np.linalg.norm(_orthonormal(rng, w.shape[0], r).T @ w @ _orthonormal(rng, w.shape[1], r))
                     for _ in range(random_trials)])
    amp = dw_norm / proj_dw if dw_norm > 0 and proj_dw > 0 else (math.inf if dw_norm > 0 else math.nan)
    return {"r": r, "dw_norm": dw_norm, "w_norm": float(np.sqrt(np.sum(sw ** 2))), "proj_dw": proj_dw,
            "proj_w": proj_w, "proj_random": float(rand.mean()), "proj_random_std": float(rand.std()),
            "amplification": amp}


# ------------------------------------------------------------------------------------------
# the report

def _json_float(x):
    x = float(x)
    return x if math.isfinite(x) else None


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return _json_float(obj)
    return obj


def _leaf_facts(node) -> dict:
    meta = node.meta
    methods = sorted({meta[n].method for n in node.active})
    has_term = [n for n in node.active if "a" in node.states[n].arrays()]
    gains = [meta[n].method for n in node.active if node.states[n].scales_base]
    rank = sum(meta[n].rank for n in has_term)
    notes = []
    if gains:
        notes.append(f"{', '.join(sorted(set(gains)))} rescales W0 itself, so ΔW is not only the low-rank term "
                     "(its rank can exceed the adapter's)")
    rewritten = sorted({meta[n].method + "/" + meta[n].init for n in node.active if rewrites_base(meta[n])})
    return {"methods": methods, "rank": rank, "low_rank": bool(has_term) and not gains,
            "has_factors": bool(has_term), "notes": notes, "rewritten": rewritten}


def _layer_report(path: str, index, w0, dw, facts: dict, a, top_r, seed, random_trials) -> dict:
    s = spectrum(dw)
    numerical = int(np.sum(s > s[0] * max(dw.shape) * np.finfo(np.float32).eps)) if s[0] > 0 else 0
    rank = facts["rank"] if a is None else a.shape[1]   # AdaLoRA: the triplets still in use
    entry = {"path": path, "layer": index, "shape": list(dw.shape), "methods": facts["methods"], "rank": rank,
             "adapter_rank": facts["rank"],
             "low_rank": facts["low_rank"], "dw_norm": float(np.linalg.norm(dw)),
             "singular_values": s[:TOP_SINGULAR], "numerical_rank": numerical, "effective_rank": effective_rank(s),
             "stable_rank": stable_rank(s), "energy_rank_90": energy_rank(s, 0.9), "energy_rank_99": energy_rank(s, 0.99),
             "notes": list(facts["notes"])}
    r = top_r if top_r is not None else rank
    if entry["dw_norm"] == 0:
        entry["amplification"] = None
        entry["amplification_skipped"] = ("ΔW is zero (an untrained adapter: b, or AdaLoRA's e, is still 0; or every "
                                          "AdaLoRA triplet pruned)")
    elif r < 1:
        entry["amplification"] = None
        entry["amplification_skipped"] = (f"{'/'.join(facts['methods'])} has no low-rank ΔW (adapter rank 0); pass "
                                          f"top_r to project W on ΔW's top directions anyway")
    else:
        r = min(int(r), min(dw.shape))
        entry["amplification"] = amplification(w0, dw, r, seed=seed, random_trials=random_trials)
    return entry


def _layer_keys(adapted) -> set:
    """The keys :func:`delta_weights` would return, without computing anything."""
    return {_layer_key(path, idx) for path, node in _nodes(adapted)
            for idx in np.ndindex(*node.shape[:node.layout.stack])}


def _split_index(key: str, path: str):
    if key == path:
        return None
    return [int(i) for i in key[len(path) + len("[layer "):-1].split(",")]


def _layers(adapted, base_params):
    """Yields ``(key, path, index, w0, dw, facts, a)`` per layer (2-D float64 matrices)."""
    base = _base_lookup(base_params)
    for path, node in _nodes(adapted):
        facts = _leaf_facts(node)
        n_stack, rows = node.layout.stack, _rows(node)
        dws = _per_layer(path, _delta(path, node, base), n_stack, rows)
        w0s = _per_layer(path, _w0(path, node, base), n_stack, rows)
        a = _node_factor(node)
        a_s = {k: _drop_zero_columns(m) for k, m in _per_layer(path, a, n_stack, rows).items()} if a is not None else {}
        if facts["rewritten"]:
            facts = {**facts, "notes": facts["notes"] + [
                f"{', '.join(facts['rewritten'])}: ΔW from the pretrained W is s*(A*B - A0*B0), of rank up to 2r"
                if path in base else
                f"{', '.join(facts['rewritten'])} made the frozen base a residual W - s*A0*B0: ΔW here is "
                "W_merged - residual = s*A*B; pass base_params (the pretrained weights) for the update from W"]}
        for key, dw in dws.items():
            yield key, path, _split_index(key, path), w0s[key], dw, facts, a_s.get(key)


def analyze(adapted, *, other=None, top_r: int | None = None, base_params=None, seed: int = 0,
            random_trials: int = 10) -> dict:
    """The LoRA paper's §7 analysis of every adapted weight of ``adapted``, as a JSON-able dict.

    ``report["layers"][key]`` (keys as in :func:`delta_weights`): ``path``, ``layer`` (the stacked
    index or None), ``shape`` ``[d_in, d_out]``, ``methods``, ``rank`` (the adapter's rank in use),
    ``low_rank`` (ΔW is exactly the low-rank term: False for IA3 and DoRA, which rescale W0),
    ``dw_norm`` ``||ΔW||_F``, ``singular_values`` (the top 32), ``numerical_rank``,
    ``effective_rank``, ``stable_rank``, ``energy_rank_90`` / ``_99``, ``amplification`` (the dict of
    :func:`amplification` at ``r = top_r`` or the adapter's rank, or None with
    ``amplification_skipped`` saying why) and ``notes``.

    With ``other`` (a second adapted tree of the same model, e.g. another rank or seed),
    ``report["similarity"][key]`` holds ``r1``, ``r2`` and ``grid`` (:func:`similarity_grid` of the
    two runs' ``a`` factors) for every layer both have a factor for, and
    ``report["similarity_skipped"][key]`` the reason for every other layer (IA3: no factor; a layer
    only one run adapts; different shapes); φ reads only the factors, so ``other`` needs no base.
    ``base_params``: see :func:`delta_weights` (needed for PiSSA / OLoRA). ``seed`` / ``random_trials``: the random
    baseline of :func:`amplification`.
    """
    if top_r is not None and (not isinstance(top_r, (int, np.integer)) or isinstance(top_r, bool) or top_r < 1):
        raise ValueError(f"top_r must be a positive int (the number of ΔW's top directions), got {top_r!r}")
    layers, mine = {}, {}
    for key, path, index, w0, dw, facts, a in _layers(adapted, base_params):
        layers[key] = _layer_report(path, index, w0, dw, facts, a, top_r, seed, random_trials)
        mine[key] = a
    if not layers:
        raise ValueError("the tree holds no adapted weight with an active adapter (a prompt / head-only run, or "
                         "plain parameters): there is no weight update ΔW to analyze")
    report = {"top_r": top_r, "layers": layers}
    if other is not None:
        theirs = factors(other)
        other_keys = _layer_keys(other)
        sim, skipped = {}, {}
        for key, a in mine.items():
            if key not in other_keys:
                skipped[key] = "the other tree does not adapt this weight"
            elif a is None:
                skipped[key] = f"no low-rank factor here ({'/'.join(layers[key]['methods'])}): φ needs an a factor"
            elif key not in theirs:
                skipped[key] = "no low-rank factor in the other tree: φ needs an a factor"
            elif theirs[key].shape[0] != a.shape[0]:
                skipped[key] = f"d_in differs: {a.shape[0]} here, {theirs[key].shape[0]} in the other tree"
            elif a.shape[1] == 0 or theirs[key].shape[1] == 0:
                skipped[key] = "an a factor has no non-zero column (AdaLoRA: every e is 0, untrained or pruned)"
            else:
                grid = similarity_grid(a, theirs[key])
                sim[key] = {"r1": a.shape[1], "r2": theirs[key].shape[1], "grid": grid}
        for key in sorted(other_keys - set(mine)):
            skipped[key] = "only the other tree adapts this weight"
        report["similarity"] = sim
        report["similarity_skipped"] = skipped
    return _jsonable(report)


# ------------------------------------------------------------------------------------------
# plots

_LAYER_NUMBER = r"(?<=[_/.])\d+(?=[/.]|$)|^\d+(?=/)"


def _group(key: str) -> str:
    """The module kind of a layer key: the stacked index and layer numbers dropped
    (``params/encoder/layer_3/query/kernel`` -> ``params/encoder/layer_*/query/kernel``)."""
    return re.sub(_LAYER_NUMBER, "*", key.split("[layer ")[0])


def _label(key: str) -> str:
    """The layer a key names within its :func:`_group` (``layer 3``)."""
    found = re.search(r"\[layer ([^\]]+)\]", key)
    if found:
        return f"layer {found.group(1)}"
    numbers = re.findall(_LAYER_NUMBER, key)
    return "layer " + ",".join(numbers) if numbers else key


def _short(key: str, width: int = 40) -> str:
    return key if len(key) <= width else "…" + key[-(width - 1):]


def _spread(items: list, n: int) -> list:
    if len(items) <= n:
        return items
    return [items[round(i * (len(items) - 1) / (n - 1))] for i in range(n)]


def _save(plt, fig, path) -> str:
    """Lays out, writes and closes a figure; returns the path."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def plot(report: Mapping[str, Any], out_dir) -> list:
    """Draws :func:`analyze`'s report as PNG files in ``out_dir`` and returns their paths:
    ``spectrum.png`` (``σ_i / σ_1`` of ΔW per layer, one panel per kind of weight, one line per
    layer), ``amplification.png`` (the amplification factor per layer, and W projected on ΔW's, its
    own and random top-r directions) and, with a comparison, ``similarity.png`` (φ heat maps of up to
    six layers, as the paper's Fig. 3)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    layers = report.get("layers") or {}
    if not layers:
        raise ValueError("the report has no layers: nothing to plot (is it the output of jlora.analysis.analyze?)")
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []

    groups = {}
    for key in layers:
        groups.setdefault(_group(key), []).append(key)
    shown = _spread(list(groups), 12)
    cols = min(3, len(shown))
    rows = math.ceil(len(shown) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, g in zip(axes.flat, shown):
        keys = groups[g]
        cmap = plt.get_cmap("viridis")
        for n, key in enumerate(keys):
            s = np.asarray(layers[key]["singular_values"] or [], np.float64)
            if s.size == 0 or s[0] <= 0:
                continue
            ax.semilogy(np.arange(1, s.size + 1), np.maximum(s / s[0], 1e-12), marker=".", lw=1,
                        color=cmap(n / max(len(keys) - 1, 1)), label=_label(key))
        ax.set_title(_short(g), fontsize=8)
        ax.set_xlabel("i"), ax.set_ylabel("σ_i / σ_1"), ax.grid(alpha=0.3)
        if 1 < len(keys) <= 8:
            ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(shown):]:
        ax.axis("off")
    fig.suptitle("singular values of ΔW")
    paths.append(_save(plt, fig, out / "spectrum.png"))

    amp = {k: v["amplification"] for k, v in layers.items() if v.get("amplification")}
    if amp:
        keys = list(amp)
        x = np.arange(len(keys))
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(max(8.0, 0.35 * len(keys) + 4), 4.2))
        ax1.bar(x, [amp[k]["amplification"] or 0.0 for k in keys], color="tab:blue")
        ax1.set_ylabel("||ΔW||_F / ||U^T W V||_F"), ax1.set_title("amplification factor")
        width = 0.27
        for n, (field, label) in enumerate((("proj_dw", "ΔW's top-r"), ("proj_w", "W's own top-r"),
                                            ("proj_random", "random r-dim"))):
            ax2.bar(x + (n - 1) * width, [amp[k][field] or 0.0 for k in keys], width, label=label)
        ax2.set_yscale("log"), ax2.set_ylabel("||U^T W V||_F"), ax2.set_title("W projected on r directions")
        ax2.legend(fontsize=7)
        for ax in (ax1, ax2):
            ax.set_xticks(x)
            ax.set_xticklabels([_short(k, 28) for k in keys], rotation=90, fontsize=6)
            ax.grid(alpha=0.3, axis="y")
        paths.append(_save(plt, fig, out / "amplification.png"))

    sim = report.get("similarity") or {}
    if sim:
        keys = _spread(list(sim), 6)
        cols = min(3, len(keys))
        rows = math.ceil(len(keys) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.6 * rows), squeeze=False)
        for ax, key in zip(axes.flat, keys):
            grid = np.asarray(sim[key]["grid"], np.float64)
            im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", origin="upper", aspect="auto",
                           extent=(0.5, grid.shape[1] + 0.5, grid.shape[0] + 0.5, 0.5))
            ax.set_xlabel("j (other run)"), ax.set_ylabel("i (this run)")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_title(_short(key), fontsize=8)
            fig.colorbar(im, ax=ax, fraction=0.046)
        for ax in list(axes.flat)[len(keys):]:
            ax.axis("off")
        fig.suptitle("subspace similarity φ(A1, A2, i, j)")
        paths.append(_save(plt, fig, out / "similarity.png"))
    return paths
