"""Benchmark: one DoRA training step four ways, in the same process, on the same weights.

  lora        ``jlora.LoRA`` through ``jlora.lift``: ``x @ W0 + s * ((x @ A) @ B)`` (the reference:
              what DoRA adds on top of LoRA).
  dora        ``jlora.DoRA`` through ``jlora.lift``: ``g * (x @ W0) + g * s * ((x @ A) @ B)`` with
              ``g = m / ||W0 + s A B||`` and the norm in closed form
              (``jlora.methods.dora.dora_norm``: one rank-r contraction with W0, no kernel-sized array).
  dora_peft   the same lifted DoRA step, but with the norm computed the way PEFT's
              ``DoraLinearLayer`` does on every forward: ``lora_weight = A @ B`` and
              ``||W0 + s * lora_weight||`` (a kernel-sized intermediate per adapted kernel). Done by
              replacing the module-level function ``jlora.methods.dora.dora_norm`` (which
              ``DoRAState.gain`` calls) with :func:`peft_dora_norm` while this variant's loss is
              traced, and restoring it afterwards; the number of calls is recorded and must be > 0.
              Everything else (factored matmul, detached norm) is jlora's, as it is PEFT's.
  dora_merge  ``model.apply(jlora.merge(params), x)`` inside the step: ``m * (W0 + s A B) / norm``
              materialised for every adapted kernel on every step, and a full-size weight gradient.

All four use ``jlora.train.make_step`` (grads w.r.t. the adapter's trainable arrays only: A, B,
and DoRA's magnitude m; ``optax.adam``; donated buffers), the model, batch, seed and timing of
``lift_step.py`` (imported from it: the decoder with ``nn.scan(nn.remat(Block))``, first call,
warm-up, round-robin timed steps, an ahead-of-time compile for XLA's memory and cost analysis).
Adapters (rank 8, alpha 16) on q, k, v, out, up, down; ``lora_b`` is filled with random values
(so the low-rank path, and DoRA's gain ``g != 1``, really act). LoRA and DoRA get the same A and
B. The three DoRA variants' first-step losses must agree (rtol 1e-4) or the script fails.

    .venv/bin/python benchmarks/dora_step.py                      # CPU defaults, < 3 minutes
    .venv/bin/python benchmarks/dora_step.py --d-model 1024 --layers 12 --heads 16 --seq 1024 \\
        --batch 8 --steps 10                                       # a GPU

See benchmarks/README.md for what each number means.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

if os.path.dirname(os.path.abspath(__file__)) not in sys.path:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import lift_step as ls  # noqa: E402  (model, batch, timing and reporting helpers)

import jlora  # noqa: E402
import jlora.methods.dora  # noqa: E402
import jlora.train  # noqa: E402

VARIANTS = ("lora", "dora", "dora_peft", "dora_merge")
DORA_VARIANTS = ("dora", "dora_peft", "dora_merge")
REFERENCES = ("lora", "dora")
RTOL = 1e-4
TAG = "dora_step"


# ------------------------------------------------------------------------------------------
# PEFT's way of taking the norm

_PEFT_NORM_CALLS = [0]


def peft_dora_norm(w0, a, b, scale, w0_sq, layout):
    """``||W0 + s A B||`` per output unit the way PEFT's ``DoraLinearLayer.get_weight_norm`` takes
    it: form ``lora_weight = A @ B`` (kernel-sized), add it to W0 (kernel-sized again), then the
    norm over the input axes. Same signature as ``jlora.methods.dora.dora_norm``; ``w0_sq`` unused."""
    _PEFT_NORM_CALLS[0] += 1
    s, ni = layout.stack, layout.inputs
    a = a.astype(jnp.float32)
    b = b.astype(jnp.float32)
    lora_weight = lax.dot_general(a, b, (((a.ndim - 1,), (s,)), (tuple(range(s)), tuple(range(s)))),
                                  precision=lax.Precision.HIGHEST)           # stack + inputs + outputs
    weight = w0.astype(jnp.float32) + scale * lora_weight
    return jnp.sqrt(jnp.sum(weight * weight, axis=tuple(range(s, s + ni))))


@contextlib.contextmanager
def peft_norm():
    """Within the block, ``DoRAState.gain`` (and so ``jlora.lift``) takes the norm with
    :func:`peft_dora_norm`. Only what is *traced* inside the block is affected."""
    original = jlora.methods.dora.dora_norm
    jlora.methods.dora.dora_norm = peft_dora_norm
    try:
        yield
    finally:
        jlora.methods.dora.dora_norm = original


# ------------------------------------------------------------------------------------------
# setup

def build(args):
    """``(setups, batch, mlp)`` with ``setups[v] = (make_loss, trainable, frozen)`` like
    ``lift_step.build``; ``make_loss()`` returns a fresh loss (and a fresh ``jlora.lift``)."""
    model, mlp, batch, params = ls.build_base(args)

    def adapt(spec):
        adapted = jlora.apply(params, spec, key=jax.random.key(args.seed + 1), model=model.apply,
                              example=(batch["x"],))
        return jlora.partition(ls.randomize_b(adapted, args.seed + 2))

    kw = dict(rank=args.rank, alpha=args.alpha, targets=ls.TARGETS)
    lora_t, lora_f = adapt(jlora.LoRA(**kw))
    dora_t, dora_f = adapt(jlora.DoRA(**kw))

    def make_lift_loss(patched=False):
        def make():
            forward = jlora.lift(model.apply, strict=True)  # strict: fail rather than silently materialise

            def loss(p, b, key):
                with peft_norm() if patched else contextlib.nullcontext():
                    return ls.cross_entropy(forward(p, b["x"]), b["y"])
            return loss
        return make

    def make_merge_loss():
        def loss(p, b, key):
            return ls.cross_entropy(model.apply(jlora.merge(p), b["x"]), b["y"])
        return loss

    setups = {
        "lora": (make_lift_loss(), lora_t, lora_f),
        "dora": (make_lift_loss(), dora_t, dora_f),
        "dora_peft": (make_lift_loss(patched=True), dora_t, dora_f),
        "dora_merge": (make_merge_loss, dora_t, dora_f),
    }
    return setups, batch, mlp


def parse_args(argv=None):
    """lift_step.py's flags (sizes, rank / alpha / lr, steps, warmup, seed, --no-compile-split,
    --out) with this benchmark's variants."""
    return ls.parse_args(argv, doc=__doc__, variants=VARIANTS, name=TAG)


# ------------------------------------------------------------------------------------------
# run

def run(args, warm_up=True):
    """The benchmark; returns the report (a JSON-able dict). ``args`` as from :func:`parse_args`
    (``args.steps`` may be set below 10 here, e.g. by a test)."""
    t_start = time.perf_counter()
    load_start = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    tokens = args.batch * args.seq
    optimizer = optax.adam(args.lr)
    variants = tuple(args.variants)

    if warm_up:
        ls.warm_up_process(args, optimizer, build_fn=build)
    setups, batch, mlp = build(args)
    n_trainable = {v: int(sum(x.size for x in jax.tree_util.tree_leaves(setups[v][1]))) for v in VARIANTS}
    n_frozen = {v: int(sum(x.size for x in jax.tree_util.tree_leaves(setups[v][2]))) for v in VARIANTS}
    config = {
        "d_model": args.d_model, "layers": args.layers, "heads": args.heads, "head_dim": args.d_model // args.heads,
        "mlp": mlp, "vocab": args.vocab, "seq": args.seq, "batch": args.batch, "tokens_per_step": tokens,
        "rank": args.rank, "alpha": args.alpha, "targets": ls.TARGETS, "optimizer": f"adam(lr={args.lr})",
        "dtype": "float32", "steps": args.steps, "warmup": args.warmup, "seed": args.seed,
        "variants": list(variants),
        "trainable_params": n_trainable, "frozen_params": n_frozen,
        "trainable_bytes": {v: ls.tree_bytes(setups[v][1]) for v in VARIANTS},
        "frozen_bytes": {v: ls.tree_bytes(setups[v][2]) for v in VARIANTS},
    }
    print(f"[{TAG}] {jax.default_backend()} {jax.devices()[0].device_kind}: d={args.d_model} L={args.layers} "
          f"H={args.heads} seq={args.seq} batch={args.batch} rank={args.rank}; trainable lora "
          f"{n_trainable['lora']:,} / dora {n_trainable['dora']:,}, frozen {n_frozen['lora']:,} params", flush=True)

    # phase 1: first call (trace + compile + one step) and warmup steps, variant by variant
    _PEFT_NORM_CALLS[0] = 0
    state, results = ls.first_calls(setups, variants, batch, optimizer, args.warmup, tag=TAG)
    peft_calls = _PEFT_NORM_CALLS[0]
    if "dora_peft" in variants and peft_calls == 0:
        raise AssertionError("dora_peft: the materialising norm was never called; jlora.methods.dora.dora_norm "
                             "is no longer what DoRAState.gain calls, so the patch did nothing")

    # honesty check: the DoRA variants are one function of the same weights and batch
    doras = [v for v in DORA_VARIANTS if v in variants]
    first = {v: results[v]["first_step_loss"] for v in variants}
    for v in doras[1:]:
        np.testing.assert_allclose(first[v], first[doras[0]], rtol=RTOL,
                                   err_msg=f"first-step loss of {v!r} differs from {doras[0]!r}")

    # phase 2: timed steps, round-robin; phase 3: statistics, compile split, memory / cost analysis
    times = ls.round_robin(state, variants, batch, args.steps)
    ls.summarize(state, results, times, setups, variants, optimizer, batch, tokens,
                 compile_split=not args.no_compile_split, tag=TAG)
    if args.no_compile_split:
        # no cold compile: XLA's memory / cost analysis of the executable already built for the
        # timed steps (jax's caches return it without recompiling; the numbers are the same)
        for v in variants:
            step, t, f, opt_state, _ = state[v]
            compiled = step.jitted.lower(t, f, opt_state, batch, None).compile()
            results[v]["compiled_memory"] = ls.compiled_memory(compiled)
            results[v]["compiled_memory_from"] = "the timed step's executable (--no-compile-split)"

    ratios = {}
    for ref in REFERENCES:
        if ref not in results:
            continue
        for v in variants:
            if v == ref or (ref == "dora" and v == "lora"):
                continue
            ratio = ls.ratio_vs(results[v], results[ref])
            f, rf = (results[x].get("compiled_memory", {}).get("xla_flops") for x in (v, ref))
            if f and rf:
                ratio["xla_flops"] = f / rf
            ratios[f"{v}/{ref}"] = ratio
    loss_ref = doras[0] if doras else None
    loss_check = {
        "variants": doras, "reference": loss_ref, "rtol": RTOL, "first_step_losses": first,
        "max_rel_diff": (max(abs(first[v] - first[loss_ref]) / abs(first[loss_ref]) for v in doras)
                         if doras else None),
        "max_abs_loss_diff_over_all_steps": {v: float(np.max(np.abs(np.asarray(state[v][4])
                                                                    - np.asarray(state[loss_ref][4]))))
                                             for v in doras},
    }

    machine = ls.machine_info()
    machine["loadavg_start"] = load_start
    machine["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return {
        "benchmark": TAG,
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": None,
        "machine": machine,
        "code": ls.code_info(),
        "config": config,
        "dora_peft_norm": {"how": "jlora.methods.dora.dora_norm replaced by dora_step.peft_dora_norm "
                                  "(A @ B and ||W0 + s A B|| formed) while dora_peft is traced",
                           "calls_while_tracing_phase1": peft_calls},
        "results": results,
        "ratios": ratios,
        "first_step_loss_check": loss_check,
        "wall_s": time.perf_counter() - t_start,
    }


def write_report(report, out):
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as fh:
        json.dump(report, fh, indent=2)
        fh.write("\n")
    return out


def main(argv=None):
    args = parse_args(argv)
    report = run(args)
    if argv is None:
        report["command"] = " ".join([os.path.basename(sys.executable), *sys.argv])
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"{TAG}_{jax.default_backend()}.json")
    write_report(report, out)
    for name, r in report["ratios"].items():
        print(f"[{TAG}] {name:16s} step time x{r['step_time']:.3f} (min x{r['step_time_min']:.3f})"
              + (f"   temp mem x{r['temp_size_in_bytes']:.3f}" if "temp_size_in_bytes" in r else "")
              + (f"   flops x{r['xla_flops']:.3f}" if "xla_flops" in r else ""))
    print(f"[{TAG}] wrote {out} ({report['wall_s']:.0f} s)")
    return report


if __name__ == "__main__":
    main()
