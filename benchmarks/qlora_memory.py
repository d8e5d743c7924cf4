"""Benchmark: memory of QLoRA (NF4 + double quant) vs bf16 LoRA on a ~1.1B-parameter Llama.

The model is a Llama-family decoder, ``jlora.models.llama.LlamaForCausalLM`` in bfloat16 with
``scan_layers=True`` (default: 1.12B parameters, TinyLlama-1.1B's shape but with 8 KV heads
instead of 4: hidden 2048, 22 layers, 32 heads, intermediate 5632, vocab 32000, untied head).
Every variant adapts every linear projection (``DEFAULT_TARGETS["all-linear"]``:
q/k/v/o/gate/up/down) with rank-8 float32 factors:

  lora_bf16   ``jlora.LoRA``: frozen base in bfloat16.
  qlora       ``jlora.QLoRA(quant="nf4", double_quant=True, compute_dtype=bfloat16,
              quantize_frozen="all-linear")``: every linear kernel (the untied lm_head too) in NF4
              with double quantisation; the embedding and the RMSNorm scales stay bfloat16.

Measured, in this order:

1. **Frozen-weight bytes at full depth, without materialising any weight**: the parameters are
   ``jax.eval_shape(model.init)`` and the adapted tree is ``jax.eval_shape(jlora.apply)`` (jlora's
   apply and quantisation trace on abstract values); ``jlora.count(adapted)["frozen_bytes"]``, plus a
   per-group breakdown. A third variant, ``qlora_head_bf16`` (``quantize_frozen=None``: the
   untied lm_head stays bfloat16, as bitsandbytes / PEFT leave it), is measured in phases 1 and 2.
2. **XLA's compiled memory of one training step at full depth, again without weights**: the step
   (``jlora.train.make_step``: next-token cross-entropy, AdamW, gradients w.r.t. the factors only,
   donated buffers) is lowered on ``ShapeDtypeStruct`` arguments and compiled;
   ``compiled.memory_analysis()``: argument / output / alias / temp bytes, and
   ``total_live_bytes_est = argument + output + temp - alias``. The same at ``--run-layers`` depth
   gives the per-layer slope. ``hoisted_f32_weight_converts`` counts the bytes of whole frozen
   weights that the compiled program converts to float32 (XLA:CPU has no bf16 matmul: it upcasts
   the bf16 base kernels, and hoists that convert of the *stacked* kernels out of the layer loop, so
   the CPU temp of ``lora_bf16`` holds a float32 copy of every layer; bf16 matmuls are native on a
   GPU, so this is not expected there, but it was not checked on one).
3. **A real run** (weights materialised: random ``initializer_range`` normal init, on the host
   CPU, adapted there, then put on the device): first-call time, ``--warmup`` untimed and
   ``--steps`` timed steps, tokens/s. On a GPU at full depth (``--gpu-run-layers``), one
   subprocess per variant so that each ``memory_stats()["peak_bytes_in_use"]`` belongs to that
   variant alone. On CPU at ``--run-layers`` depth (default 2: 0.27B parameters, half of them the
   embedding and the head), both variants in one subprocess with their timed steps taken
   round-robin, so that load from other jobs falls on both alike (CPU has no memory counters).

    .venv/bin/python benchmarks/qlora_memory.py                     # CPU: about 2.5 minutes on 2 cores
    .venv/bin/python benchmarks/qlora_memory.py --layers 22 --run-layers 2 --seq 128 --batch 1 \\
        --out benchmarks/results/qlora_memory_cpu.json

See benchmarks/README.md ("qlora_memory.py") for what each number means.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # GPU: children share the device; peaks are real

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import jlora  # noqa: E402
import jlora.train  # noqa: E402
from jlora.models import llama  # noqa: E402
from jlora.quant import QuantizedArray  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lift_step import code_info, compiled_memory, device_memory, machine_info  # noqa: E402

VARIANTS = ("lora_bf16", "qlora", "qlora_head_bf16")
RUN_VARIANTS = ("lora_bf16", "qlora")
TARGETS = llama.DEFAULT_TARGETS["all-linear"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, default=22)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--intermediate", type=int, default=5632)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--remat", action="store_true", help="LlamaConfig.remat: recompute each layer in the backward")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--run-layers", type=int, default=2, help="depth of the small compile and of the real run on CPU")
    p.add_argument("--gpu-run-layers", type=int, default=None, help="depth of the real run on a GPU (default --layers)")
    p.add_argument("--steps", type=int, default=8, help="timed steps per variant in the real run")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variants", default=",".join(VARIANTS), help="variants compiled (phase 2)")
    p.add_argument("--run-variants", default=",".join(RUN_VARIANTS), help="variants trained for real (phase 3)")
    p.add_argument("--no-real-run", action="store_true", help="skip phase 3")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/qlora_memory_<backend>.json)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)        # internal: one real run
    p.add_argument("--child-layers", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.variants = tuple(v.strip() for v in args.variants.split(",") if v.strip())
    args.run_variants = tuple(v.strip() for v in args.run_variants.split(",") if v.strip())
    if not args.variants or set(args.variants) - set(VARIANTS) or set(args.run_variants) - set(VARIANTS):
        p.error(f"--variants / --run-variants must be subsets of {VARIANTS}")
    if args.run_layers >= args.layers:
        p.error("--run-layers must be smaller than --layers")
    return args


# ------------------------------------------------------------------------------------------
# model, specs, step

def model_for(args, layers):
    cfg = llama.LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                            num_hidden_layers=layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                            tie_word_embeddings=False, scan_layers=True, remat=args.remat,
                            dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    return llama.LlamaForCausalLM(cfg)


def spec_for(args, variant):
    common = dict(rank=args.rank, alpha=args.alpha, targets=TARGETS)
    if variant == "lora_bf16":
        return jlora.LoRA(**common)
    if variant == "qlora":
        return jlora.QLoRA(**common, quant="nf4", double_quant=True, compute_dtype=jnp.bfloat16,
                           quantize_frozen="all-linear")
    if variant == "qlora_head_bf16":
        return jlora.QLoRA(**common, quant="nf4", double_quant=True, compute_dtype=jnp.bfloat16)
    raise ValueError(variant)


def example_ids(args):
    return jnp.zeros((1, 8), jnp.int32)


def abstract_adapted(args, variant, layers):
    model = model_for(args, layers)
    ids = example_ids(args)
    params = jax.eval_shape(model.init, jax.random.key(0), ids)
    spec = spec_for(args, variant)
    adapted = jax.eval_shape(lambda p: jlora.apply(p, spec, jax.random.key(1), model=model.apply, example=(ids,)),
                             params)
    return model, params, adapted


def make_loss(model):
    forward = jlora.lift(model.apply, strict=True)

    def loss(params, batch, key):
        logits = forward(params, batch["x"])
        return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch["y"]).mean()
    return loss


def optimizer_for(args):
    return optax.adamw(args.lr)


def abstract_batch(args):
    s = jax.ShapeDtypeStruct((args.batch, args.seq), jnp.int32)
    return {"x": s, "y": s}


def real_batch(args):
    rng = np.random.default_rng(args.seed)
    ids = jnp.asarray(rng.integers(0, args.vocab, (args.batch, args.seq + 1)), jnp.int32)
    return {"x": ids[:, :-1], "y": ids[:, 1:]}


# ------------------------------------------------------------------------------------------
# bytes

def _group(path: str) -> str:
    if "embed_tokens" in path:
        return "embedding"
    if "lm_head" in path:
        return "lm_head"
    if "norm" in path:
        return "norms"
    if "/layers/" in path or path.startswith("params/model/layers"):
        return "layer_linear"
    return "other"


def frozen_breakdown(adapted) -> dict:
    """Frozen bytes per group (embedding, lm_head, layer linear kernels, norms)."""
    _, frozen = jlora.partition(adapted)
    flat, _ = jax.tree_util.tree_flatten_with_path(frozen, is_leaf=lambda x: isinstance(x, QuantizedArray))
    out = {}
    for kp, leaf in flat:
        if leaf is None:
            continue
        path = "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in kp)
        n = leaf.nbytes if isinstance(leaf, QuantizedArray) else int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize
        out[_group(path)] = out.get(_group(path), 0) + int(n)
    return out


# ------------------------------------------------------------------------------------------
# phase 2: compile on abstract arguments

_CONVERT = re.compile(r"= f32\[([\d,]*)\]\{[^}]*\} (?:fusion|convert)\(%(frozen[^,)]*)\)")


def hoisted_converts(hlo_text: str) -> dict:
    """Float32 copies of whole frozen parameters in the compiled HLO: a text match on single-operand
    ``fusion`` / ``convert`` instructions whose operand is a frozen entry parameter and whose
    result is float32 (on XLA:CPU these are the ``wrapped_convert`` fusions of bf16 kernels)."""
    seen = {}
    for shape, operand in _CONVERT.findall(hlo_text):
        dims = [int(d) for d in shape.split(",") if d]
        seen[operand] = 4 * int(np.prod(dims)) if dims else 4
    return {"count": len(seen), "bytes": int(sum(seen.values())), "operands": sorted(seen)}

def compile_step(args, variant, layers) -> dict:
    t0 = time.perf_counter()
    model, _, adapted = abstract_adapted(args, variant, layers)
    trainable, frozen = jlora.partition(adapted)
    optimizer = optimizer_for(args)
    opt_state = jax.eval_shape(optimizer.init, trainable)
    step = jlora.train.make_step(make_loss(model), optimizer)
    t1 = time.perf_counter()
    lowered = step.jitted.lower(trainable, frozen, opt_state, abstract_batch(args), None)
    t2 = time.perf_counter()
    compiled = lowered.compile()
    t3 = time.perf_counter()
    try:
        hoisted = hoisted_converts(compiled.as_text())
    except Exception as e:  # noqa: BLE001 - diagnostics only
        hoisted = {"error": repr(e)}
    cm = compiled_memory(compiled)
    out = {"layers": layers, "abstract_apply_s": t1 - t0, "trace_lower_s": t2 - t1, "xla_compile_s": t3 - t2,
           "compiled_memory": cm, "hoisted_f32_weight_converts": hoisted}
    if hoisted.get("bytes") and "temp_size_in_bytes" in cm:
        # an estimate (assumes the copies are all live at once, as they are when hoisted out of the loop)
        out["temp_minus_f32_weight_copies_est"] = cm["temp_size_in_bytes"] - hoisted["bytes"]
        out["total_live_minus_f32_weight_copies_est"] = cm.get("total_live_bytes_est", 0) - hoisted["bytes"]
    return out


# ------------------------------------------------------------------------------------------
# phase 3: one real run (in a child process)

def _setup(args, variant, model, ids, dev):
    cpu = jax.devices("cpu")[0]
    t0 = time.perf_counter()
    with jax.default_device(cpu):  # materialise and quantise on the host: the device sees only the adapted tree
        params = jax.jit(model.init)(jax.random.key(args.seed), ids)
        adapted = jlora.apply(params, spec_for(args, variant), jax.random.key(args.seed + 1), model=model.apply,
                              example=(ids,))
        adapted = jax.block_until_ready(adapted)
        del params
    setup_host_s = time.perf_counter() - t0
    adapted = jax.block_until_ready(jax.device_put(adapted, dev))
    trainable, frozen = jlora.partition(adapted)
    return trainable, frozen, setup_host_s


def real_run(args, variants, layers) -> dict:
    """Materialises, adapts and trains each variant; with several variants (CPU) the timed steps
    are taken round-robin so that load from other processes falls on all of them alike."""
    model = model_for(args, layers)
    ids = example_ids(args)
    dev = jax.devices()[0]
    optimizer = optimizer_for(args)
    batch = jax.device_put(real_batch(args), dev)
    state, out = {}, {}
    for v in variants:
        trainable, frozen, setup_host_s = _setup(args, v, model, ids, dev)
        opt_state = optimizer.init(trainable)
        mem_setup = device_memory()
        step = jlora.train.make_step(make_loss(model), optimizer)
        t0 = time.perf_counter()
        trainable, opt_state, metrics = jax.block_until_ready(step(trainable, frozen, opt_state, batch, None))
        first_call = time.perf_counter() - t0
        losses = [float(metrics["loss"])]
        for _ in range(args.warmup):
            trainable, opt_state, metrics = jax.block_until_ready(step(trainable, frozen, opt_state, batch, None))
            losses.append(float(metrics["loss"]))
        state[v] = [step, trainable, frozen, opt_state]
        out[v] = {"variant": v, "layers": layers, "device": f"{dev.platform} {dev.device_kind}",
                  "frozen_bytes_on_device": int(sum(x.nbytes for x in jax.tree_util.tree_leaves(frozen))),
                  "trainable_bytes": int(sum(x.nbytes for x in jax.tree_util.tree_leaves(trainable))),
                  "setup_host_s": setup_host_s, "first_call_s": first_call, "losses": losses, "step_s_all": [],
                  "device_memory_after_setup": mem_setup}
    for _ in range(args.steps):
        for v in variants:
            step, trainable, frozen, opt_state = state[v]
            t0 = time.perf_counter()
            trainable, opt_state, metrics = jax.block_until_ready(step(trainable, frozen, opt_state, batch, None))
            out[v]["step_s_all"].append(time.perf_counter() - t0)
            out[v]["losses"].append(float(metrics["loss"]))
            state[v][1], state[v][3] = trainable, opt_state
    for v in variants:
        r, times = out[v], out[v]["step_s_all"]
        med = statistics.median(times) if times else None
        r.update({"step_s_median": med, "step_s_min": min(times) if times else None,
                  "tokens_per_s": args.batch * args.seq / med if med else None,
                  "all_finite": bool(np.all(np.isfinite(r["losses"]))),
                  "timing": ("round-robin with " + ", ".join(variants)) if len(variants) > 1 else "alone in its process",
                  "device_memory_after_steps": device_memory()})
    return out


def run_child(args, variants, layers) -> dict:
    """Runs ``real_run`` in a fresh process (its own device-memory high-water mark)."""
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "r.json")
        argv = [sys.executable, os.path.abspath(__file__), "--child", ",".join(variants), "--child-layers", str(layers),
                "--child-out", out]
        for k in ("hidden", "layers", "heads", "kv_heads", "intermediate", "vocab", "seq", "batch", "rank", "alpha",
                  "lr", "run_layers", "steps", "warmup", "seed"):
            argv += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
        if args.remat:
            argv.append("--remat")
        t0 = time.perf_counter()
        proc = subprocess.run(argv, capture_output=True, text=True)
        if proc.returncode:
            return {v: {"variant": v, "layers": layers, "error": proc.stderr[-4000:]} for v in variants}
        with open(out) as f:
            r = json.load(f)
        for v in r:
            r[v]["process_wall_s"] = time.perf_counter() - t0
        return r


# ------------------------------------------------------------------------------------------
# main

def _ratio(a, b):
    return a / b if a and b else None


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        r = real_run(args, args.child.split(","), args.child_layers)
        with open(args.child_out, "w") as f:
            json.dump(r, f)
        return r

    t_start = time.perf_counter()
    load_start = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    backend = jax.default_backend()
    print(f"[qlora_memory] {backend} {jax.devices()[0].device_kind}: Llama hidden={args.hidden} layers={args.layers} "
          f"heads={args.heads}/{args.kv_heads} intermediate={args.intermediate} vocab={args.vocab}; "
          f"batch {args.batch} x {args.seq} tokens", flush=True)

    # phase 1: bytes at full depth, abstract
    params_abs = jax.eval_shape(model_for(args, args.layers).init, jax.random.key(0), example_ids(args))
    n_params = int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params_abs)))
    bytes_ = {}
    for v in VARIANTS:
        t0 = time.perf_counter()
        _, _, adapted = abstract_adapted(args, v, args.layers)
        c = jlora.count(adapted)
        bytes_[v] = {**c, "frozen_breakdown": frozen_breakdown(adapted), "abstract_apply_s": time.perf_counter() - t0}
        print(f"[qlora_memory] {v:16s} frozen {c['frozen_bytes'] / 2**30:7.3f} GiB   trainable "
              f"{c['trainable']:,} params ({c['trainable_bytes'] / 2**20:.1f} MiB)", flush=True)
    dense = bytes_["lora_bf16"]["frozen_breakdown"].get("layer_linear", 0) + bytes_["lora_bf16"]["frozen_breakdown"].get("lm_head", 0)
    quant = bytes_["qlora"]["frozen_breakdown"].get("layer_linear", 0) + bytes_["qlora"]["frozen_breakdown"].get("lm_head", 0)
    bits_per_linear_param = 16.0 * quant / dense if dense else None

    # phase 2: compiled step memory at full depth and at --run-layers depth, abstract
    compiled = {}
    for v in args.variants:
        compiled[v] = {}
        for layers in (args.layers, args.run_layers):
            r = compile_step(args, v, layers)
            compiled[v][str(layers)] = r
            cm = r["compiled_memory"]
            print(f"[qlora_memory] {v:16s} L={layers:<3d} compile {r['trace_lower_s']:6.1f} s trace+lower "
                  f"{r['xla_compile_s']:6.1f} s XLA   argument {cm.get('argument_size_in_bytes', 0) / 2**30:.3f} GiB  "
                  f"temp {cm.get('temp_size_in_bytes', 0) / 2**30:.3f} GiB  live est "
                  f"{cm.get('total_live_bytes_est', 0) / 2**30:.3f} GiB  (f32 weight copies "
                  f"{r['hoisted_f32_weight_converts'].get('bytes', 0) / 2**30:.3f} GiB)", flush=True)
        full, small = compiled[v][str(args.layers)]["compiled_memory"], compiled[v][str(args.run_layers)]["compiled_memory"]
        compiled[v]["per_layer"] = {k: (full[k] - small[k]) / (args.layers - args.run_layers)
                                    for k in ("argument_size_in_bytes", "temp_size_in_bytes", "output_size_in_bytes",
                                              "alias_size_in_bytes", "total_live_bytes_est") if k in full and k in small}

    # phase 3: real runs; on a GPU one process per variant (its own peak), on CPU one process
    # with the variants' timed steps taken round-robin
    runs = {}
    if not args.no_real_run:
        if backend == "gpu":
            layers = args.gpu_run_layers or args.layers
            for v in args.run_variants:
                runs.update(run_child(args, [v], layers))
        else:
            layers = args.run_layers
            runs.update(run_child(args, list(args.run_variants), layers))
        for v in args.run_variants:
            r = runs[v]
            if "error" in r:
                print(f"[qlora_memory] {v:16s} real run FAILED:\n{r['error']}", flush=True)
                continue
            peak = (r.get("device_memory_after_steps") or {}).get("peak_bytes_in_use")
            print(f"[qlora_memory] {v:16s} real run L={layers}: first call {r['first_call_s']:.1f} s, step "
                  f"{1e3 * r['step_s_median']:.0f} ms, {r['tokens_per_s']:.0f} tok/s, loss {r['losses'][0]:.4f} -> "
                  f"{r['losses'][-1]:.4f}" + (f", peak {peak / 2**30:.3f} GiB" if peak else ""), flush=True)

    ratios = {}  # {variant: {quantity: variant / lora_bf16}}
    L = str(args.layers)
    for v in VARIANTS:
        if v == "lora_bf16":
            continue
        r = {"frozen_bytes": _ratio(bytes_[v]["frozen_bytes"], bytes_["lora_bf16"]["frozen_bytes"])}
        if v in compiled and "lora_bf16" in compiled:
            q, l = compiled[v][L], compiled["lora_bf16"][L]
            for k in ("argument_size_in_bytes", "temp_size_in_bytes", "total_live_bytes_est"):
                r[f"compiled_{k}_L{L}"] = _ratio(q["compiled_memory"].get(k), l["compiled_memory"].get(k))
            for k in ("temp_minus_f32_weight_copies_est", "total_live_minus_f32_weight_copies_est"):
                r[f"compiled_{k}_L{L}"] = _ratio(q.get(k, q["compiled_memory"].get(
                    "temp_size_in_bytes" if k.startswith("temp") else "total_live_bytes_est")), l.get(k))
        a, b = runs.get(v, {}), runs.get("lora_bf16", {})
        if a.get("tokens_per_s") and b.get("tokens_per_s"):
            r["tokens_per_s_real_run"] = a["tokens_per_s"] / b["tokens_per_s"]
            r["peak_bytes_in_use_real_run"] = _ratio((a.get("device_memory_after_steps") or {}).get("peak_bytes_in_use"),
                                                     (b.get("device_memory_after_steps") or {}).get("peak_bytes_in_use"))
        ratios[v] = r

    machine = machine_info()
    machine["loadavg_start"] = load_start
    machine["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    report = {
        "benchmark": "qlora_memory",
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([".venv/bin/python", "benchmarks/qlora_memory.py", *sys.argv[1:]]) if argv is None else None,
        "machine": machine,
        "code": code_info(),
        "config": {
            "model": "LlamaForCausalLM (jlora.models.llama), scan_layers=True, untied head, bfloat16 params and compute",
            "hidden": args.hidden, "layers": args.layers, "heads": args.heads, "kv_heads": args.kv_heads,
            "intermediate": args.intermediate, "vocab": args.vocab, "remat": args.remat, "params": n_params,
            "batch": args.batch, "seq": args.seq, "tokens_per_step": args.batch * args.seq,
            "rank": args.rank, "alpha": args.alpha, "targets": TARGETS, "lora_factor_dtype": "float32",
            "optimizer": f"adamw(lr={args.lr})",
            "variants": {v: repr(spec_for(args, v)) for v in VARIANTS},
            "run_layers": args.run_layers, "steps": args.steps, "warmup": args.warmup,
        },
        "method": {
            "frozen_bytes": "jax.eval_shape(model.init) -> jax.eval_shape(jlora.apply) -> jlora.count: full depth, no weights materialised",
            "compiled_memory": "make_step(...).jitted.lower(ShapeDtypeStructs).compile().memory_analysis(): full depth and "
                               "--run-layers depth, no weights materialised; per_layer = (full - small) / (layers - run_layers)",
            "real_run": "weights materialised (random init on the host CPU, adapted there, device_put), one subprocess per "
                        "variant; on CPU at --run-layers depth, on GPU at full depth",
        },
        "frozen_bytes": bytes_,
        "bits_per_quantized_linear_param": bits_per_linear_param,
        "compiled_step": compiled,
        "real_run": runs,
        "ratios_over_lora_bf16": ratios,
        "wall_s": time.perf_counter() - t_start,
    }
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"qlora_memory_{backend}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as fh:
        json.dump(report, fh, indent=2)
        fh.write("\n")
    for v, r in ratios.items():
        print(f"[qlora_memory] {v} / lora_bf16: " + ", ".join(f"{k} x{x:.3f}" for k, x in r.items() if x))
    print(f"[qlora_memory] wrote {out} ({report['wall_s']:.0f} s)")
    return report


if __name__ == "__main__":
    main()
