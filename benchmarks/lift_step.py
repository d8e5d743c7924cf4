"""Benchmark: one LoRA training step three ways, in the same process, on the same weights.

  lift         ``jlora.lift(model.apply)`` on the adapted tree: ``x @ W0 + s * ((x @ A) @ B)``
               emitted by jlora's interpreter from the unmodified Linen model.
  merge        ``model.apply(jlora.merge(params), x)`` inside the step: ``W0 + s * A @ B`` is
               materialised for every adapted kernel on every step (and its full-size gradient
               formed in the backward pass).
  handwritten  a second Linen model whose projections compute ``x @ W0 + s * ((x @ A) @ B)``
               explicitly with ``lora_a`` / ``lora_b`` as their own params: the reference a
               careful person would write by hand.

All three use the same step (``jlora.train.make_step``: grads w.r.t. the LoRA factors only,
``optax.adam``, donated buffers), the same weights and the same batch; the first-step losses
must agree (rtol 1e-4) or the script fails. The model is a decoder-style transformer: token
embedding, ``nn.scan(nn.remat(Block))`` with DenseGeneral q/k/v ``(d, heads, head_dim)`` and out
``(heads, head_dim, d)``, an MLP ``up``/``down``, pre-LayerNorm, causal attention, an untied
vocabulary head and a next-token cross-entropy loss. LoRA (rank 8 by default) on
q, k, v, out, up, down.

    .venv/bin/python benchmarks/lift_step.py                      # CPU defaults, < 3 minutes
    .venv/bin/python benchmarks/lift_step.py --d-model 256 --layers 4 --heads 8 --seq 128 \\
        --batch 8 --steps 10 --out benchmarks/results/lift_step_cpu.json

See benchmarks/README.md for what each number means.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

import jlora
import jlora.train

VARIANTS = ("lift", "merge", "handwritten")
TARGETS = r".*/(query|key|value|out|up|down)/kernel"
LORA_NAMES = ("lora_a", "lora_b")


# ------------------------------------------------------------------------------------------
# (a), (b): the plain Linen model that jlora adapts

def _causal_attention(q, k, v):
    """q, k, v: (batch, seq, heads, head_dim) -> (batch, seq, heads, head_dim)."""
    s = q.shape[1]
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    mask = jnp.tril(jnp.ones((s, s), bool))
    logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v)


class Block(nn.Module):
    d_model: int
    heads: int
    mlp: int

    @nn.compact
    def __call__(self, x, _=None):
        hd = self.d_model // self.heads
        h = nn.LayerNorm(name="ln1")(x)
        q = nn.DenseGeneral((self.heads, hd), name="query")(h)
        k = nn.DenseGeneral((self.heads, hd), name="key")(h)
        v = nn.DenseGeneral((self.heads, hd), name="value")(h)
        x = x + nn.DenseGeneral(self.d_model, axis=(-2, -1), name="out")(_causal_attention(q, k, v))
        h = nn.LayerNorm(name="ln2")(x)
        x = x + nn.Dense(self.d_model, name="down")(jax.nn.gelu(nn.Dense(self.mlp, name="up")(h)))
        return x, None


class Decoder(nn.Module):
    vocab: int
    d_model: int
    layers: int
    heads: int
    mlp: int
    block: type = Block
    block_kw: tuple = ()

    @nn.compact
    def __call__(self, ids):
        x = nn.Embed(self.vocab, self.d_model, name="embed")(ids)
        blocks = nn.scan(nn.remat(self.block), variable_axes={"params": 0}, split_rngs={"params": True},
                         length=self.layers)
        x, _ = blocks(self.d_model, self.heads, self.mlp, *[v for _, v in self.block_kw], name="blocks")(x, None)
        x = nn.LayerNorm(name="ln_f")(x)
        return nn.Dense(self.vocab, name="head")(x)


# ------------------------------------------------------------------------------------------
# (c): the hand-written factored LoRA model

class LoRAProj(nn.Module):
    """``x @ W0 + bias + scale * ((x @ A) @ B)`` contracting the last ``n_in`` axes of ``x``.

    ``kernel`` (W0) and ``bias`` are frozen (they come in through the frozen half); ``lora_a``
    ``(in..., r)`` and ``lora_b`` ``(r, out...)`` are the trainable factors, in jlora's layout.
    """

    features: tuple
    n_in: int
    rank: int
    scale: float

    @nn.compact
    def __call__(self, x):
        in_shape = x.shape[x.ndim - self.n_in:]
        init = nn.initializers.lecun_normal(in_axis=tuple(range(self.n_in)),
                                            out_axis=tuple(range(self.n_in, self.n_in + len(self.features))))
        w0 = self.param("kernel", init, in_shape + tuple(self.features))
        bias = self.param("bias", nn.initializers.zeros, tuple(self.features))
        a = self.param("lora_a", nn.initializers.normal(0.02), in_shape + (self.rank,))
        b = self.param("lora_b", nn.initializers.zeros, (self.rank,) + tuple(self.features))
        x_axes = tuple(range(x.ndim - self.n_in, x.ndim))
        w_axes = tuple(range(self.n_in))
        y = jax.lax.dot_general(x, w0, ((x_axes, w_axes), ((), ())))
        xa = jax.lax.dot_general(x, a, ((x_axes, w_axes), ((), ())))           # (..., r)
        low = jax.lax.dot_general(xa, b, (((xa.ndim - 1,), (0,)), ((), ())))  # (..., out...)
        return y + bias + self.scale * low


class HandBlock(nn.Module):
    d_model: int
    heads: int
    mlp: int
    rank: int
    scale: float

    @nn.compact
    def __call__(self, x, _=None):
        hd = self.d_model // self.heads
        proj = lambda feats, n_in, name: LoRAProj(feats, n_in, self.rank, self.scale, name=name)
        h = nn.LayerNorm(name="ln1")(x)
        q = proj((self.heads, hd), 1, "query")(h)
        k = proj((self.heads, hd), 1, "key")(h)
        v = proj((self.heads, hd), 1, "value")(h)
        x = x + proj((self.d_model,), 2, "out")(_causal_attention(q, k, v))
        h = nn.LayerNorm(name="ln2")(x)
        x = x + proj((self.d_model,), 1, "down")(jax.nn.gelu(proj((self.mlp,), 1, "up")(h)))
        return x, None


# ------------------------------------------------------------------------------------------
# setup

def cross_entropy(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels).mean()


def randomize_b(adapted, seed):
    """Kaiming init leaves B = 0, which would make every variant trivially equal: give B
    non-zero values (host-side RNG) so the low-rank path really contributes to the loss."""
    rng = np.random.default_rng(seed)

    def f(leaf):
        if not jlora.is_node(leaf):
            return leaf
        return leaf.with_(b={n: jnp.asarray(0.05 * rng.standard_normal(v.shape), v.dtype) for n, v in leaf.b.items()})
    return jax.tree_util.tree_map(f, adapted, is_leaf=jlora.is_node)


def handwritten_halves(adapted, hand_template):
    """(trainable, frozen) for the hand-written model, holding exactly the weights of ``adapted``:
    frozen = every base weight (W0, biases, LayerNorms, embedding, head), trainable = A and B."""
    flat_t, flat_f = {}, {}
    for node_or_leaf_path, leaf in _flat_adapted(adapted):
        if jlora.is_node(leaf):
            (name,) = leaf.active
            flat_f[node_or_leaf_path] = leaf.base
            parent = node_or_leaf_path[:-1]
            flat_t[parent + ("lora_a",)] = leaf.a[name]
            flat_t[parent + ("lora_b",)] = leaf.b[name]
        else:
            flat_f[node_or_leaf_path] = leaf
    want = traverse_util.flatten_dict(flax.core.unfreeze(hand_template))
    have = {**flat_t, **flat_f}
    if set(want) != set(have):
        raise AssertionError(f"hand-written tree does not match: missing {sorted(set(want) - set(have))[:4]}, "
                             f"extra {sorted(set(have) - set(want))[:4]}")
    for k, v in want.items():
        if tuple(v.shape) != tuple(have[k].shape):
            raise AssertionError(f"{'/'.join(k)}: hand-written shape {v.shape}, adapted {have[k].shape}")
    # same structure for both halves with None holes, like jlora.partition, so make_step's
    # combine() puts them back together
    trainable = traverse_util.unflatten_dict({k: flat_t.get(k) for k in want})
    frozen = traverse_util.unflatten_dict({k: flat_f.get(k) for k in want})
    return trainable, frozen


def _flat_adapted(adapted):
    out = []

    def walk(prefix, tree):
        if isinstance(tree, dict) or isinstance(tree, flax.core.FrozenDict):
            for k, v in tree.items():
                walk(prefix + (k,), v)
        else:
            out.append((prefix, tree))
    walk((), adapted)
    return out


def tree_bytes(tree):
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree)))


def copy_tree(tree):
    return jax.tree_util.tree_map(lambda x: jnp.array(x, copy=True), tree)


def device_memory():
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 - some backends raise instead of returning None
        stats = None
    if not stats:
        return None
    keep = ("bytes_in_use", "peak_bytes_in_use", "bytes_limit")
    return {k: int(stats[k]) for k in keep if k in stats}


def compiled_memory(compiled):
    """XLA's static memory analysis of a compiled step (available on CPU and GPU)."""
    out = {}
    try:
        ma = compiled.memory_analysis()
    except Exception as e:  # noqa: BLE001
        ma, out["memory_analysis_error"] = None, repr(e)
    if ma is not None:
        for k in ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes",
                  "alias_size_in_bytes", "generated_code_size_in_bytes"):
            if hasattr(ma, k):
                out[k] = int(getattr(ma, k))
        if all(k in out for k in ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes")):
            out["total_live_bytes_est"] = (out["temp_size_in_bytes"] + out["argument_size_in_bytes"]
                                           + out["output_size_in_bytes"] - out.get("alias_size_in_bytes", 0))
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        if cost and "flops" in cost:
            out["xla_flops"] = float(cost["flops"])
    except Exception:  # noqa: BLE001
        pass
    return out


def code_info():
    """Which jlora was measured: its path, git commit, and whether jlora/ had uncommitted changes."""
    import subprocess
    pkg = os.path.dirname(os.path.abspath(jlora.__file__))
    root = os.path.dirname(pkg)
    out = {"jlora_path": pkg, "jlora_version": getattr(jlora, "__version__", None)}
    try:
        git = lambda *a: subprocess.run(["git", "-C", root, *a], capture_output=True, text=True, timeout=10,
                                        check=True).stdout.strip()
        out["git_commit"] = git("rev-parse", "HEAD")
        out["jlora_dirty"] = bool(git("status", "--porcelain", "--", "jlora"))
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def machine_info():
    dev = jax.devices()[0]
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    cpu_model = None
    try:
        with open("/proc/cpuinfo") as f:
            cpu_model = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), None)
    except OSError:
        pass
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_model": cpu_model or platform.processor() or None,
        "cpu_count": os.cpu_count(),
        "cpu_affinity": affinity,
        "python": sys.version.split()[0],
        "jax": jax.__version__,
        "jaxlib": getattr(__import__("jaxlib"), "__version__", None),
        "flax": flax.__version__,
        "optax": optax.__version__,
        "backend": jax.default_backend(),
        "device_kind": dev.device_kind,
        "device_count": jax.device_count(),
    }


# ------------------------------------------------------------------------------------------
# main

def parse_args(argv=None, doc=None, variants=VARIANTS, name="lift_step"):
    """lift_step's CLI; ``doc`` / ``variants`` / ``name`` let another benchmark (dora_step.py)
    reuse the same model, batch and timing flags with its own variants and output name."""
    p = argparse.ArgumentParser(description=(doc or __doc__).split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--mlp-ratio", type=int, default=4, help="MLP hidden = mlp_ratio * d_model")
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant (>= 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per variant after the first call")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variants", default=",".join(variants), help="comma-separated subset of " + ",".join(variants))
    p.add_argument("--no-compile-split", action="store_true",
                   help="skip the extra (cold) trace + compile per variant that splits the compile time and "
                        "gives XLA's memory analysis")
    p.add_argument("--out", default=None, help=f"JSON path (default benchmarks/results/{name}_<backend>.json)")
    args = p.parse_args(argv)
    if args.steps < 10:
        p.error("--steps must be >= 10")
    if args.d_model % args.heads:
        p.error("--d-model must be divisible by --heads")
    args.variants = tuple(v.strip() for v in args.variants.split(",") if v.strip())
    bad = [v for v in args.variants if v not in variants]
    if bad or not args.variants:
        p.error(f"unknown variants {bad}; choose from {variants}")
    return args


def build_base(args):
    """``(model, mlp, batch, params)``: the plain Linen decoder, its MLP width, the batch
    (``x`` ids, ``y`` next ids) and its randomly initialised weights, all from ``args.seed``."""
    mlp = args.mlp_ratio * args.d_model
    model = Decoder(args.vocab, args.d_model, args.layers, args.heads, mlp)
    rng = np.random.default_rng(args.seed)
    ids = jnp.asarray(rng.integers(0, args.vocab, (args.batch, args.seq + 1)), jnp.int32)
    batch = {"x": ids[:, :-1], "y": ids[:, 1:]}
    params = jax.jit(model.init)(jax.random.key(args.seed), batch["x"])  # stands in for pretrained weights
    return model, mlp, batch, params


def build(args):
    """Model, weights, batch and per-variant ``(make_loss, trainable, frozen)``; ``make_loss()``
    returns a fresh loss function (a fresh ``jlora.lift`` for the lift variant, so that a new
    step built from it is traced from scratch)."""
    model, mlp, batch, params = build_base(args)
    scale = args.alpha / args.rank
    hand = Decoder(args.vocab, args.d_model, args.layers, args.heads, mlp, block=HandBlock,
                   block_kw=(("rank", args.rank), ("scale", scale)))
    spec = jlora.LoRA(rank=args.rank, alpha=args.alpha, targets=TARGETS)
    adapted = jlora.apply(params, spec, key=jax.random.key(args.seed + 1), model=model.apply, example=(batch["x"],))
    adapted = randomize_b(adapted, args.seed + 2)
    trainable, frozen = jlora.partition(adapted)
    h_trainable, h_frozen = handwritten_halves(adapted, jax.eval_shape(hand.init, jax.random.key(0), batch["x"]))

    def make_lift_loss():
        forward = jlora.lift(model.apply, strict=True)  # strict: fail rather than silently materialise

        def loss_lift(p, b, key):
            return cross_entropy(forward(p, b["x"]), b["y"])
        return loss_lift

    def make_merge_loss():
        def loss_merge(p, b, key):
            return cross_entropy(model.apply(jlora.merge(p), b["x"]), b["y"])
        return loss_merge

    def make_hand_loss():
        def loss_hand(p, b, key):
            return cross_entropy(hand.apply(p, b["x"]), b["y"])
        return loss_hand

    setups = {
        "lift": (make_lift_loss, trainable, frozen),
        "merge": (make_merge_loss, trainable, frozen),
        "handwritten": (make_hand_loss, h_trainable, h_frozen),
    }
    return setups, batch, mlp


def warm_up_process(args, optimizer, build_fn=None):
    """One step of every variant on a tiny model, discarded: the first variant measured would
    otherwise also pay the process's one-time costs (first jit, first lowering of each primitive)."""
    tiny = argparse.Namespace(**{**vars(args), "d_model": 32, "layers": 1, "heads": 2, "mlp_ratio": 2,
                                 "vocab": 64, "seq": 8, "batch": 2, "rank": 2})
    setups, batch, _ = (build_fn or build)(tiny)
    for v in args.variants:
        make_loss, t, f = setups[v]
        step = jlora.train.make_step(make_loss(), optimizer)
        t = copy_tree(t)
        jax.block_until_ready(step(t, f, optimizer.init(t), batch, None))


# ------------------------------------------------------------------------------------------
# timing (shared with dora_step.py)

def first_calls(setups, variants, batch, optimizer, warmup, tag="lift_step"):
    """Phase 1, per variant in turn: a fresh ``jlora.train.make_step``, its first call (trace +
    compile + one step) timed, then ``warmup`` untimed steps. Returns ``(state, results)``:
    ``state[v] = [step, trainable, frozen, opt_state, losses]``, ``results[v]`` the first-call
    numbers."""
    state, results = {}, {}
    for v in variants:
        make_loss, t, f = setups[v]
        step = jlora.train.make_step(make_loss(), optimizer)
        t = copy_tree(t)  # make_step donates trainable/opt_state: every variant starts from its own copy
        opt_state = optimizer.init(t)
        mem_before = device_memory()
        t0 = time.perf_counter()
        t, opt_state, metrics = jax.block_until_ready(step(t, f, opt_state, batch, None))
        first_call = time.perf_counter() - t0
        losses = [float(metrics["loss"])]
        for _ in range(warmup):
            t, opt_state, metrics = jax.block_until_ready(step(t, f, opt_state, batch, None))
            losses.append(float(metrics["loss"]))
        state[v] = [step, t, f, opt_state, losses]
        results[v] = {"first_call_s": first_call, "first_step_loss": losses[0],
                      "device_memory_before": mem_before, "device_memory_after_warmup": device_memory()}
        print(f"[{tag}] {v:12s} first call {first_call:7.2f} s   loss {losses[0]:.6f}", flush=True)
    return state, results


def round_robin(state, variants, batch, steps):
    """Phase 2: ``steps`` timed steps per variant, round-robin (v1, v2, ..., v1, ...), each timed
    to ``block_until_ready``; updates ``state`` in place and returns ``{variant: [seconds]}``."""
    times = {v: [] for v in variants}
    for _ in range(steps):
        for v in variants:
            step, t, f, opt_state, losses = state[v]
            t0 = time.perf_counter()
            t, opt_state, metrics = jax.block_until_ready(step(t, f, opt_state, batch, None))
            times[v].append(time.perf_counter() - t0)
            losses.append(float(metrics["loss"]))
            state[v][1], state[v][3] = t, opt_state
    return times


def summarize(state, results, times, setups, variants, optimizer, batch, tokens, compile_split=True,
              tag="lift_step"):
    """Phase 3: step-time statistics into ``results``, and (``compile_split``) a fresh step lowered
    and compiled ahead of time: trace + lower vs XLA compile time, XLA's memory / cost analysis."""
    for v in variants:
        step, t, f, opt_state, losses = state[v]
        med = statistics.median(times[v])
        r = results[v]
        r.update({
            "step_s_median": med, "step_s_min": min(times[v]), "step_s_max": max(times[v]),
            "step_s_all": times[v], "tokens_per_s": tokens / med,
            "losses": losses, "final_loss": losses[-1],
        })
        if compile_split:
            fresh = jlora.train.make_step(setups[v][0](), optimizer)
            t0 = time.perf_counter()
            lowered = fresh.jitted.lower(t, f, opt_state, batch, None)
            t1 = time.perf_counter()
            compiled = lowered.compile()
            t2 = time.perf_counter()
            r["trace_lower_s"], r["xla_compile_s"] = t1 - t0, t2 - t1
            r["compiled_memory"] = compiled_memory(compiled)
        print(f"[{tag}] {v:12s} step {1e3 * med:8.1f} ms (median of {len(times[v])})   "
              f"{tokens / med:9.0f} tok/s" + (f"   trace+lower {r['trace_lower_s']:.2f} s  XLA compile "
                                               f"{r['xla_compile_s']:.2f} s" if "trace_lower_s" in r else ""),
              flush=True)


def ratio_vs(r, ref):
    """Ratios of one variant's results ``r`` to a reference variant's ``ref`` (above 1: slower /
    more memory; for ``tokens_per_s`` below 1: fewer tokens/s)."""
    ratio = {
        "step_time": r["step_s_median"] / ref["step_s_median"],
        "step_time_min": r["step_s_min"] / ref["step_s_min"],
        "tokens_per_s": r["tokens_per_s"] / ref["tokens_per_s"],
        "first_call": r["first_call_s"] / ref["first_call_s"],
    }
    for k in ("trace_lower_s", "xla_compile_s"):
        if k in r and k in ref:
            ratio[k[:-2]] = r[k] / ref[k]
    cm, rcm = r.get("compiled_memory", {}), ref.get("compiled_memory", {})
    for k in ("temp_size_in_bytes", "total_live_bytes_est"):
        if cm.get(k) and rcm.get(k):
            ratio[k] = cm[k] / rcm[k]
    return ratio


def main(argv=None):
    args = parse_args(argv)
    t_start = time.perf_counter()
    load_start = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    tokens = args.batch * args.seq
    optimizer = optax.adam(args.lr)

    warm_up_process(args, optimizer)
    setups, batch, mlp = build(args)
    n_trainable = {v: int(sum(x.size for x in jax.tree_util.tree_leaves(setups[v][1]))) for v in VARIANTS}
    n_frozen = {v: int(sum(x.size for x in jax.tree_util.tree_leaves(setups[v][2]))) for v in VARIANTS}
    assert len(set(n_trainable.values())) == 1 and len(set(n_frozen.values())) == 1, (n_trainable, n_frozen)

    config = {
        "d_model": args.d_model, "layers": args.layers, "heads": args.heads, "head_dim": args.d_model // args.heads,
        "mlp": mlp, "vocab": args.vocab, "seq": args.seq, "batch": args.batch, "tokens_per_step": tokens,
        "rank": args.rank, "alpha": args.alpha, "lora_targets": TARGETS, "optimizer": f"adam(lr={args.lr})",
        "dtype": "float32", "steps": args.steps, "warmup": args.warmup, "seed": args.seed,
        "variants": list(args.variants),
        "trainable_params": n_trainable["lift"], "frozen_params": n_frozen["lift"],
        "trainable_bytes": tree_bytes(setups["lift"][1]), "frozen_bytes": tree_bytes(setups["lift"][2]),
    }
    print(f"[lift_step] {jax.default_backend()} {jax.devices()[0].device_kind}: d={args.d_model} L={args.layers} "
          f"H={args.heads} seq={args.seq} batch={args.batch} rank={args.rank}; trainable {n_trainable['lift']:,} "
          f"/ frozen {n_frozen['lift']:,} params", flush=True)

    # phase 1, per variant in turn: first call (trace + compile + one step), then warmup steps
    state, results = first_calls(setups, args.variants, batch, optimizer, args.warmup)

    # honesty check: same weights, same batch -> same loss, whichever way the step is taken
    ref_v = "handwritten" if "handwritten" in results else args.variants[0]
    for v in args.variants:
        np.testing.assert_allclose(results[v]["first_step_loss"], results[ref_v]["first_step_loss"], rtol=1e-4,
                                   err_msg=f"first-step loss of {v!r} differs from {ref_v!r}")

    # phase 2: timed steps, round-robin over the variants so that load from other processes on a
    # shared machine hits all of them alike
    times = round_robin(state, args.variants, batch, args.steps)

    # phase 3: the compile split, from a fresh step (and a fresh jlora.lift) so nothing is cached:
    # trace + lower (Python: Flax, jlora's interpreter, autodiff) vs XLA compile; plus XLA's memory
    # analysis of the compiled step
    summarize(state, results, times, setups, args.variants, optimizer, batch, tokens,
              compile_split=not args.no_compile_split)

    ratios = {}
    if "handwritten" in results:
        hw = results["handwritten"]
        for v in ("lift", "merge"):
            if v not in results:
                continue
            ratios[f"{v}/handwritten"] = ratio_vs(results[v], hw)
    loss_drift = {v: float(np.max(np.abs(np.asarray(state[v][4]) - np.asarray(state[ref_v][4]))))
                  for v in args.variants}

    machine = machine_info()
    machine["loadavg_start"] = load_start
    machine["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    report = {
        "benchmark": "lift_step",
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]) if argv is None else None,
        "machine": machine,
        "code": code_info(),
        "config": config,
        "results": results,
        "ratios": ratios,
        "first_step_losses_allclose_rtol": 1e-4,
        "max_abs_loss_diff_over_all_steps_vs_" + ref_v: loss_drift,
        "wall_s": time.perf_counter() - t_start,
    }
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"lift_step_{jax.default_backend()}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as fh:
        json.dump(report, fh, indent=2)
        fh.write("\n")
    for name, r in ratios.items():
        print(f"[lift_step] {name:18s} step time x{r['step_time']:.3f}   first call x{r['first_call']:.3f}"
              + (f"   trace+lower x{r['trace_lower']:.2f}   XLA compile x{r['xla_compile']:.2f}" if "trace_lower" in r else "")
              + (f"   temp mem x{r['temp_size_in_bytes']:.3f}" if "temp_size_in_bytes" in r else ""))
    print(f"[lift_step] wrote {out} ({report['wall_s']:.0f} s)")
    return report


if __name__ == "__main__":
    main()
