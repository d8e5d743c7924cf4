"""Benchmark: one LoRA / DoRA / QLoRA training step on jlora's Llama next to Hugging Face PEFT.

jlora's ``jlora.models.llama.LlamaForCausalLM`` (``jlora.apply`` + ``jlora.partition`` +
``jlora.lift(model.apply)`` + ``jlora.train.make_step``, the model's own ``loss`` method) and
transformers' ``LlamaForCausalLM`` wrapped by PEFT (``get_peft_model``, a plain PyTorch AdamW
step, eager or ``torch.compile``), on THE SAME weights, the same LoRA factors, the same batch:

  jlora-lora          jlora.LoRA(rank 16, alpha 32) on q, k, v, o, gate, up, down
  jlora-dora          jlora.DoRA(...) on the same projections
  jlora-qlora         jlora.QLoRA(...): NF4 + double quantisation (blocks of 64), lm_head left in
                      ``--dtype`` as bitsandbytes leaves it
  peft-lora           LoraConfig(r=16, lora_alpha=32, target_modules=the same 7)
  peft-lora-compile   the same, the model under torch.compile
  peft-dora           LoraConfig(use_dora=True, ...)
  peft-dora-compile   the same, under torch.compile
  peft-qlora          BitsAndBytesConfig(load_in_4bit, nf4, double quant, compute dtype
                      ``--dtype``) + LoraConfig: CUDA only (skipped elsewhere, with the reason)

The random weights are made once (seeded) with jlora's own ``init`` in a helper process,
converted to an HF checkpoint with ``jlora.models.hf_export.hf_tensors`` (``config.json`` +
``model.safetensors``) and read by both frameworks: jlora with ``llama.load_hf_params``,
transformers with ``from_pretrained``. The LoRA factors are jlora's ``A`` and a random
``B ~ N(0, lora_b_std^2)`` (not 0, so the low-rank path contributes to the loss), written in
PEFT's layout and loaded into both. The run FAILS (exit 1, after writing the JSON) unless the
first-step losses of jlora-lora and peft-lora agree (rtol 1e-3 in float32, 1e-2 in bfloat16).

Every variant runs in its own process (its own peak memory), one after the other: first call
(trace / compile + one step), ``--warmup`` steps, then ``--steps`` timed steps, each synchronised
(``jax.block_until_ready`` / ``torch.cuda.synchronize``); median step time, tokens/s =
batch * seq / median. See benchmarks/README.md for the knobs, how MFU is counted and the results.

    .venv/bin/python benchmarks/llama_step.py --preset cpu --threads 1 --cores 1 --steps 5 --warmup 2
    python benchmarks/llama_step.py --preset issue16 --loss-chunk 256 --steps 10        # an NVIDIA GPU
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TAG = "llama_step"
RESULT_MARK = "LLAMA_STEP_RESULT "

JLORA_VARIANTS = ("jlora-lora", "jlora-dora", "jlora-qlora")
PEFT_VARIANTS = ("peft-lora", "peft-lora-compile", "peft-dora", "peft-dora-compile", "peft-qlora")
# run order: each jlora variant next to its PEFT counterparts, so slow drifts in the machine's
# load fall on both frameworks alike
VARIANTS = ("jlora-lora", "peft-lora", "peft-lora-compile", "jlora-dora", "peft-dora", "peft-dora-compile",
            "jlora-qlora", "peft-qlora")
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

PRESETS = {
    # TinyLlama-1.1B's shape at 16 layers: 953M parameters
    "issue16": dict(hidden=2048, layers=16, intermediate=5632, vocab=32000, heads=32, kv_heads=4, batch=8, seq=1024),
    "cpu": dict(hidden=512, layers=4, intermediate=1376, vocab=32000, heads=8, kv_heads=8, batch=4, seq=256),
    # --smoke: seconds per variant, for checking the plumbing
    "tiny": dict(hidden=64, layers=2, intermediate=160, vocab=512, heads=4, kv_heads=2, batch=2, seq=32),
}
SHAPE_KEYS = ("hidden", "layers", "intermediate", "vocab", "heads", "kv_heads", "batch", "seq")
LOSS_RTOL = {"float32": 1e-3, "bfloat16": 1e-2, "float16": 1e-2}
WEIGHTS_FORMAT = 1   # bump when what the prepare step writes changes (invalidates cached weights)


def log(msg):
    print(f"[{TAG}] {msg}", flush=True)


# ==========================================================================================
# arguments

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("shape (default: the preset's; an explicit flag overrides it)")
    g.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="default: issue16 on a GPU, cpu elsewhere")
    g.add_argument("--smoke", action="store_true",
                   help="preset tiny, --steps 2 --warmup 1 (unless given): checks the plumbing in seconds")
    for k in SHAPE_KEYS:
        g.add_argument("--" + k.replace("_", "-"), type=int, default=None)
    g.add_argument("--rope-theta", type=float, default=10000.0)
    g.add_argument("--rms-norm-eps", type=float, default=1e-5)
    a = p.add_argument_group("adapters and optimiser (the same in both frameworks)")
    a.add_argument("--rank", type=int, default=16)
    a.add_argument("--alpha", type=float, default=32.0)
    a.add_argument("--lr", type=float, default=1e-4)
    a.add_argument("--weight-decay", type=float, default=0.01, help="AdamW's (optax.adamw / torch.optim.AdamW)")
    a.add_argument("--lora-b-std", type=float, default=0.02, help="LoRA B ~ N(0, std^2) in both (0: PEFT's B = 0)")
    k = p.add_argument_group("knobs")
    k.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="compute and frozen-weight dtype in both frameworks (adapters stay float32); "
                        "default bfloat16 on a GPU, float32 on CPU")
    k.add_argument("--attention", choices=("explicit", "xla", "cudnn"), default=None,
                   help="jlora: LlamaConfig(attention=...); default cudnn on a GPU, explicit on CPU")
    k.add_argument("--remat", nargs="?", const="true", default=None,
                   help="jlora: LlamaConfig(remat=True), or a policy name (jlora.models._hf.REMAT_POLICIES)")
    k.add_argument("--loss-chunk", type=int, default=0,
                   help="jlora: model.loss(..., chunk=N): the vocabulary head on N sequence positions at a time "
                        "(0: off; N >= seq is the same as off)")
    k.add_argument("--no-scan", action="store_true", help="jlora: scan_layers=False (an unrolled layer loop)")
    k.add_argument("--fuse-projections", action="store_true",
                   help="jlora: LlamaConfig(fuse_projections=True): q/k/v and gate/up as one matmul each")
    k.add_argument("--peft-attention", default="sdpa", help="transformers' attn_implementation")
    k.add_argument("--peft-gradient-checkpointing", action="store_true",
                   help="PEFT: model.gradient_checkpointing_enable() (the counterpart of --remat)")
    m = p.add_argument_group("measurement")
    m.add_argument("--variants", default=None, help="comma list from " + ",".join(VARIANTS) +
                   " (default: all that can run on this backend)")
    m.add_argument("--steps", type=int, default=None, help="timed steps per variant (default 10; --smoke 2)")
    m.add_argument("--warmup", type=int, default=None, help="untimed steps after the first call (default 3; --smoke 1)")
    m.add_argument("--rounds", type=int, default=1,
                   help="run every variant this many times (fresh processes, round-robin); step times pooled")
    m.add_argument("--timeout", type=float, default=600.0, help="seconds per child process")
    m.add_argument("--compile-timeout", type=float, default=None,
                   help="seconds per child for the peft-*-compile variants (default --timeout)")
    m.add_argument("--deadline", type=float, default=None,
                   help="seconds for the whole run: a child that cannot start before it is recorded as skipped, "
                        "and none runs past it")
    m.add_argument("--threads", type=int, default=None,
                   help="CPU threads per child (1: torch.set_num_threads(1), XLA_FLAGS single-threaded, pinned)")
    m.add_argument("--cores", default=None,
                   help="taskset -c list for the children (default with --threads 1: the last CPU this process may use)")
    m.add_argument("--peak-tflops", type=float, default=None,
                   help="peak for MFU (default: 989 on an H100 / H200 in bf16 / fp16, else none)")
    m.add_argument("--no-memory-analysis", action="store_true", help="jlora: skip compiled.memory_analysis()")
    m.add_argument("--profile", type=int, default=0, metavar="N",
                   help="after the timed steps, N more under the framework's profiler: the time per category "
                        "(head / layer matmuls, attention, loss, elementwise, copies, optimizer; "
                        "benchmarks/step_profile.py) in the JSON and a side-by-side table")
    m.add_argument("--seed", type=int, default=0)
    o = p.add_argument_group("files")
    o.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "jlora_llama_step"),
                   help="the generated HF checkpoint (cached by shape / seed / dtype) and the child logs")
    o.add_argument("--log-dir", default=None, help="child logs (default <workdir>/logs)")
    o.add_argument("--out", default=None, help="JSON path (default benchmarks/results/llama_step_<backend>.json)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-config", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return args
    if args.smoke and args.preset not in (None, "tiny"):
        p.error("--smoke is the tiny preset; do not combine it with --preset")
    if args.variants is not None:
        args.variants = tuple(v.strip() for v in args.variants.split(",") if v.strip())
        bad = [v for v in args.variants if v not in VARIANTS]
        if bad or not args.variants:
            p.error(f"unknown variants {bad}; choose from {VARIANTS}")
    if args.loss_chunk < 0:
        p.error("--loss-chunk must be >= 0")
    if args.rounds < 1:
        p.error("--rounds must be >= 1")
    if args.remat is not None and args.remat.lower() in ("true", "1", "yes"):
        args.remat = True
    return args


def resolve(args, probe):
    """The run's configuration (a JSON-able dict) from the flags, the preset and the backend."""
    gpu = probe.get("jax_backend") == "gpu" or probe.get("torch_cuda", False)
    preset = "tiny" if args.smoke else (args.preset or ("issue16" if gpu else "cpu"))
    shape = dict(PRESETS[preset])
    for k in SHAPE_KEYS:
        if getattr(args, k) is not None:
            shape[k] = getattr(args, k)
    if shape["hidden"] % shape["heads"] or shape["heads"] % shape["kv_heads"]:
        raise SystemExit(f"hidden ({shape['hidden']}) must be divisible by heads ({shape['heads']}) and heads by "
                         f"kv_heads ({shape['kv_heads']})")
    dtype = args.dtype or ("bfloat16" if gpu else "float32")
    attention = args.attention or ("cudnn" if probe.get("jax_backend") == "gpu" else "explicit")
    steps = args.steps if args.steps is not None else (2 if args.smoke else 10)
    warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 3)
    cores = args.cores
    if cores is None and args.threads == 1:
        try:
            cores = str(max(os.sched_getaffinity(0)))
        except AttributeError:
            cores = None
    return {
        "preset": preset, **shape, "rope_theta": args.rope_theta, "rms_norm_eps": args.rms_norm_eps,
        "head_dim": shape["hidden"] // shape["heads"], "tie_word_embeddings": False,
        "tokens_per_step": shape["batch"] * shape["seq"],
        "rank": args.rank, "alpha": args.alpha, "lora_targets": list(PROJECTIONS), "lora_dropout": 0.0,
        "lora_b_std": args.lora_b_std, "lr": args.lr, "weight_decay": args.weight_decay,
        "optimizer": f"AdamW(lr={args.lr}, b1=0.9, b2=0.999, eps=1e-8, weight_decay={args.weight_decay})",
        "dtype": dtype, "adapter_dtype": "float32",
        "jlora": {"attention": attention, "remat": args.remat or False, "loss_chunk": args.loss_chunk,
                  "scan_layers": not args.no_scan, "fuse_projections": args.fuse_projections},
        "peft": {"attn_implementation": args.peft_attention, "gradient_checkpointing": args.peft_gradient_checkpointing,
                 "torch_compile": "torch.compile(peft_model) (default mode); optimizer step eager"},
        "steps": steps, "warmup": warmup, "rounds": args.rounds, "seed": args.seed, "timeout_s": args.timeout,
        "compile_timeout_s": args.compile_timeout, "deadline_s": args.deadline,
        "threads": args.threads, "cores": cores, "memory_analysis": not args.no_memory_analysis,
        "profile_steps": args.profile,
    }


# ==========================================================================================
# FLOPs

def flop_count(c):
    """Model FLOPs of one LoRA step (see benchmarks/README.md): ``4 N T`` (forward ``2NT``
    and the backward w.r.t. the activations ``2NT``; no frozen-weight gradient) with ``N`` the
    non-embedding parameters plus the head, plus attention (forward ``4 B S^2 hidden L / 2``,
    the causal mask counted as half; backward twice the forward), plus the adapters' ``6 N_a T``."""
    h, L, I, V = c["hidden"], c["layers"], c["intermediate"], c["vocab"]
    H, KV, D, r = c["heads"], c["kv_heads"], c["head_dim"], c["rank"]
    B, S = c["batch"], c["seq"]
    T = B * S
    shapes = {"q_proj": (h, H * D), "k_proj": (h, KV * D), "v_proj": (h, KV * D), "o_proj": (H * D, h),
              "gate_proj": (h, I), "up_proj": (h, I), "down_proj": (I, h)}
    layer = sum(i * o for i, o in shapes.values()) + 2 * h          # + the two RMSNorm scales
    n = L * layer + h + h * V                                       # + final norm + lm_head
    n_adapter = L * sum(r * (i + o) for i, o in shapes.values())
    attn_fwd = 4 * B * S * S * h * L / 2
    total = 4 * n * T + 3 * attn_fwd + 6 * n_adapter * T
    return {"N_non_embedding_plus_head": n, "N_embedding": V * h, "N_adapter_lora": n_adapter, "tokens": T,
            "linear_4NT": 4 * n * T, "attention_fwd": attn_fwd, "attention_fwd_plus_bwd": 3 * attn_fwd,
            "adapter_6NaT": 6 * n_adapter * T, "model_flops_per_step": total}


# ==========================================================================================
# children: environment

def child_env(cfg, jax_cpu=False):
    env = dict(os.environ)
    if jax_cpu:   # the prepare child makes the weights on the host, leaving the accelerator alone
        env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([ROOT, HERE] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    t = cfg.get("threads")
    if t:
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "TORCHINDUCTOR_COMPILE_THREADS"):
            env[name] = str(t)
        if t == 1:
            env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                                " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1").strip()
    return env


def child_cmd(kind, cfg):
    cmd = [sys.executable, os.path.abspath(__file__), "--child", kind, "--child-config", json.dumps(cfg)]
    if cfg.get("cores") and shutil.which("taskset"):
        cmd = ["taskset", "-c", str(cfg["cores"])] + cmd
    return cmd


def run_child(kind, cfg, timeout, log_path, jax_cpu=False, echo=True):
    """Runs one child; streams its ``[llama_step...]`` lines, keeps its whole output in ``log_path``.
    Returns ``(result_dict_or_None, info)`` with info: rc, wall_s, timed_out, tail of the output."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(child_cmd(kind, cfg), env=child_env(cfg, jax_cpu), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=True, cwd=ROOT)
    found, tail = [], []

    def reader():
        with open(log_path, "w") as fh:
            for line in proc.stdout:
                fh.write(line)
                fh.flush()
                if line.startswith(RESULT_MARK):
                    found.append(line[len(RESULT_MARK):])
                    continue
                tail.append(line)
                del tail[:-60]
                if echo and line.startswith(f"[{TAG}"):
                    sys.stdout.write("  " + line)
                    sys.stdout.flush()

    th = threading.Thread(target=reader, daemon=True)
    th.start()
    timed_out = False
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        try:
            os.killpg(proc.pid, 9)   # the child's own session: it and anything it started, nothing else
        except ProcessLookupError:
            pass
        proc.wait()
    th.join(timeout=10)
    info = {"rc": proc.returncode, "wall_s": time.perf_counter() - t0, "timed_out": timed_out,
            "log": log_path, "output_tail": "".join(tail)[-4000:]}
    result = None
    if found:
        try:
            result = json.loads(found[-1])
        except json.JSONDecodeError as e:
            info["result_parse_error"] = repr(e)
    return result, info


def emit(result):
    print(RESULT_MARK + json.dumps(result), flush=True)


def _set_torch_threads(cfg):
    import torch
    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
        try:
            torch.set_num_interop_threads(cfg["threads"])
        except RuntimeError:
            pass


def _affinity():
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:
        return None


def _maxrss_bytes():
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r) * (1 if sys.platform == "darwin" else 1024)


def _version(dist):
    try:
        from importlib.metadata import version
        return version(dist)
    except Exception:  # noqa: BLE001
        return None


def _stats(times):
    med = statistics.median(times)
    return {"step_s_median": med, "step_s_min": min(times), "step_s_max": max(times), "step_s_all": times}


# ==========================================================================================
# child: probe (the backend, the accelerator, the versions)

def child_probe(cfg):
    out = {"python": sys.version.split()[0], "platform": platform.platform(), "machine": platform.machine(),
           "cpu_count": os.cpu_count(), "cpu_affinity": _affinity()}
    try:
        with open("/proc/cpuinfo") as f:
            out["cpu_model"] = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), None)
    except OSError:
        out["cpu_model"] = platform.processor() or None
    for dist in ("jax", "jaxlib", "jax-cuda12-plugin", "jax-cuda13-plugin", "flax", "optax", "torch",
                 "transformers", "peft", "bitsandbytes", "safetensors", "numpy"):
        out["version_" + dist.replace("-", "_")] = _version(dist)
    try:
        import jax
        devs = jax.devices()
        out.update(jax_backend=jax.default_backend(), jax_device_kind=devs[0].device_kind, jax_device_count=len(devs))
    except Exception as e:  # noqa: BLE001
        out["jax_error"] = repr(e)
    try:
        import torch
        out["torch_cuda"] = bool(torch.cuda.is_available())
        out["torch_cuda_version"] = torch.version.cuda
        if out["torch_cuda"]:
            out["gpu_name"] = torch.cuda.get_device_name(0)
            out["gpu_memory_bytes"] = int(torch.cuda.get_device_properties(0).total_memory)
    except Exception as e:  # noqa: BLE001
        out["torch_error"] = repr(e)
    if shutil.which("nvidia-smi"):
        try:
            q = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=20)
            out["nvidia_smi"] = q.stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            pass
    emit(out)


# ==========================================================================================
# child: prepare (weights, LoRA factors and batch; jax on the host CPU)

def weights_key(cfg):
    keep = {k: cfg[k] for k in SHAPE_KEYS + ("rope_theta", "rms_norm_eps", "rank", "alpha", "lora_b_std", "seed",
                                              "dtype")}
    keep["format"] = WEIGHTS_FORMAT
    return hashlib.sha1(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:12]


def jlora_config(cfg, **overrides):
    """jlora's LlamaConfig for the run (``overrides``: dtype, scan_layers, ...)."""
    import jax.numpy as jnp
    from jlora.models import llama
    dt = getattr(jnp, cfg["dtype"])
    kw = dict(vocab_size=cfg["vocab"], hidden_size=cfg["hidden"], intermediate_size=cfg["intermediate"],
              num_hidden_layers=cfg["layers"], num_attention_heads=cfg["heads"], num_key_value_heads=cfg["kv_heads"],
              rope_theta=cfg["rope_theta"], rms_norm_eps=cfg["rms_norm_eps"],
              max_position_embeddings=max(2048, cfg["seq"]), tie_word_embeddings=False,
              scan_layers=cfg["jlora"]["scan_layers"], remat=cfg["jlora"]["remat"],
              attention=cfg["jlora"]["attention"], fuse_projections=cfg["jlora"].get("fuse_projections", False),
              dtype=dt, param_dtype=dt)
    kw.update(overrides)
    return llama.LlamaConfig(**kw)


def child_prepare(cfg):
    """Writes ``<dir>/config.json + model.safetensors`` (the HF checkpoint, in ``cfg["dtype"]``),
    ``lora.safetensors`` (PEFT-named, PEFT-layout float32 A and B) and ``batch.npz``; returns its
    description. Nothing is written when ``meta.json`` is already there (same key)."""
    d = cfg["weights_dir"]
    meta_path = os.path.join(d, "meta.json")
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            meta = json.load(f)
        meta["cached"] = True
        emit(meta)
        return
    t0 = time.perf_counter()
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from safetensors.numpy import save_file as save_np
    from safetensors.torch import save_file as save_torch

    import jlora
    from jlora.models import hf_export, llama

    config = jlora_config(cfg, dtype=jnp.float32, param_dtype=jnp.float32, scan_layers=False, remat=False,
                          attention="explicit")
    model = llama.LlamaForCausalLM(config)
    params = model.init_params(jax.random.key(cfg["seed"]))           # stands in for pretrained weights
    t_init = time.perf_counter() - t0
    tensors = hf_export.hf_tensors(params, "llama", config)           # jlora -> HF names, (out, in) layout
    spec = jlora.LoRA(rank=cfg["rank"], alpha=cfg["alpha"], targets=llama.DEFAULT_TARGETS["all-linear"])
    ids = jnp.zeros((1, 8), jnp.int32)
    adapted = jlora.apply(params, spec, key=jax.random.key(cfg["seed"] + 1), model=model.apply, example=(ids,))
    rng = np.random.default_rng(cfg["seed"] + 2)
    lora = {}
    for node in jax.tree_util.tree_leaves(adapted, is_leaf=jlora.is_node):
        if not jlora.is_node(node):
            continue
        a = np.asarray(node.states["default"].a, np.float32)             # (in, r)
        b_shape = (a.shape[-1], node.shape[-1])                           # (r, out)
        b = (cfg["lora_b_std"] * rng.standard_normal(b_shape)).astype(np.float32) if cfg["lora_b_std"] else \
            np.zeros(b_shape, np.float32)
        name = llama.hf_module_name(node.path)                            # base_model.model.model.layers.i....
        lora[name + ".lora_A.weight"] = np.ascontiguousarray(a.T)        # PEFT: (r, in)
        lora[name + ".lora_B.weight"] = np.ascontiguousarray(b.T)        # PEFT: (out, r)
    expected = cfg["layers"] * len(PROJECTIONS) * 2
    if len(lora) != expected:
        raise AssertionError(f"expected {expected} LoRA tensors, made {len(lora)}")
    del adapted, params
    tdtype = getattr(torch, cfg["dtype"])
    n_params = int(sum(v.size for v in tensors.values()))
    tmp = d + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_torch({k: torch.from_numpy(np.ascontiguousarray(v)).to(tdtype) for k, v in tensors.items()},
               os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    del tensors
    hf_cfg = hf_export.llama_config_json(config)
    hf_cfg["torch_dtype"] = hf_cfg["dtype"] = cfg["dtype"]
    hf_cfg["use_cache"] = False
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(hf_cfg, f, indent=2)
    save_np(lora, os.path.join(tmp, "lora.safetensors"))
    ids = np.random.default_rng(cfg["seed"] + 3).integers(0, cfg["vocab"], (cfg["batch"], cfg["seq"]), dtype=np.int64)
    np.savez(os.path.join(tmp, "batch.npz"), input_ids=ids)
    meta = {"weights_dir": d, "params": n_params, "lora_tensors": len(lora),
            "lora_params": int(sum(v.size for v in lora.values())), "hf_config": hf_cfg,
            "file_dtype": cfg["dtype"], "init_s": t_init, "prepare_s": time.perf_counter() - t0,
            "weights": "jlora LlamaForCausalLM.init_params(jax.random.key(seed)) in float32 (normal(0.02) kernels, "
                       "unit norms), cast to dtype once (round to nearest even) and read by both frameworks",
            "lora_factors": "A: jlora.LoRA's init (kaiming-uniform, as PEFT's); B ~ N(0, lora_b_std^2) (numpy, seed+2); "
                            "the same A and B loaded into both frameworks",
            "batch": "input_ids ~ U[0, vocab) (numpy, seed+3), attention_mask all ones, labels = input_ids "
                     "(unshifted; both models shift them)"}
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)
    if os.path.exists(d):
        shutil.rmtree(d)
    os.replace(tmp, d)
    meta["cached"] = False
    emit(meta)


# ==========================================================================================
# child: a jlora variant

def child_jlora(cfg):
    t_start = time.perf_counter()
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from safetensors.numpy import load_file

    import jlora
    import jlora.train
    from jlora.models import llama
    from lift_step import code_info, compiled_memory, device_memory  # noqa: F401 (house helpers)

    variant = cfg["variant"]
    method = variant.split("-", 1)[1]
    dt = getattr(jnp, cfg["dtype"])
    chunk = cfg["jlora"]["loss_chunk"] or None
    config = jlora_config(cfg)
    model = llama.LlamaForCausalLM(config)
    dev = jax.devices()[0]
    log(f"{variant}: {jax.default_backend()} {dev.device_kind}, dtype {cfg['dtype']}, attention "
        f"{config.attention}, remat {config.remat}, loss chunk {chunk}, scan {config.scan_layers}")

    t0 = time.perf_counter()
    params = llama.load_hf_params(cfg["weights_dir"], config)           # HF -> jlora, cast to param_dtype
    common = dict(rank=cfg["rank"], alpha=cfg["alpha"], targets=llama.DEFAULT_TARGETS["all-linear"])
    if method == "lora":
        spec = jlora.LoRA(**common)
    elif method == "dora":
        spec = jlora.DoRA(**common)
    elif method == "qlora":   # lm_head stays in dtype, as bitsandbytes / transformers leave it
        spec = jlora.QLoRA(**common, quant="nf4", double_quant=True, compute_dtype=dt, quantize_frozen=None)
    else:
        raise ValueError(variant)
    ids0 = jnp.zeros((1, 8), jnp.int32)
    adapted = jlora.apply(params, spec, key=jax.random.key(cfg["seed"] + 1), model=model.apply, example=(ids0,))
    del params
    factors = load_file(os.path.join(cfg["weights_dir"], "lora.safetensors"))
    n_set = [0]

    def load_factors(node):
        if not jlora.is_node(node) or "default" not in node.states:
            return node
        st = node.states["default"]
        if config.scan_layers:
            names = [llama.hf_module_name(node.path, layer=i) for i in range(cfg["layers"])]
            a = np.stack([factors[n + ".lora_A.weight"].T for n in names])
            b = np.stack([factors[n + ".lora_B.weight"].T for n in names])
        else:
            n = llama.hf_module_name(node.path)
            a, b = factors[n + ".lora_A.weight"].T, factors[n + ".lora_B.weight"].T
        if a.shape != st.a.shape or b.shape != st.b.shape:
            raise AssertionError(f"{node.path}: file A {a.shape} B {b.shape}, jlora A {st.a.shape} B {st.b.shape}")
        n_set[0] += 1
        return node.with_(states={**node.states, "default": st.replace(a=jnp.asarray(a, st.a.dtype),
                                                                         b=jnp.asarray(b, st.b.dtype))})

    adapted = jax.tree_util.tree_map(load_factors, adapted, is_leaf=jlora.is_node)
    if n_set[0] != len(PROJECTIONS) * (1 if config.scan_layers else cfg["layers"]):
        raise AssertionError(f"set the factors of {n_set[0]} adapted kernels")
    trainable, frozen = jlora.partition(adapted)
    del adapted
    counts = {"trainable_params": int(sum(x.size for x in jax.tree_util.tree_leaves(trainable))),
              "trainable_bytes": int(sum(x.nbytes for x in jax.tree_util.tree_leaves(trainable))),
              "frozen_bytes": int(sum(x.nbytes for x in jax.tree_util.tree_leaves(frozen)))}
    ids = np.load(os.path.join(cfg["weights_dir"], "batch.npz"))["input_ids"].astype(np.int32)
    host_batch = {"input_ids": ids, "labels": ids, "attention_mask": np.ones_like(ids)}
    batch = jax.device_put(host_batch, dev)
    jax.block_until_ready((trainable, frozen, batch))
    setup_s = time.perf_counter() - t0

    lifted = jlora.lift(model.apply, strict=True)
    # as `jlora train` does: no attention mask where the loss cannot tell (right padding, no label on
    # a padded position; here an all-ones mask), so cuDNN gets no dense bias
    from jlora.cli.tasks_lm import mask_is_redundant
    use_mask = not mask_is_redundant(host_batch)

    def loss_fn(p, b, key):
        loss, n = lifted(p, b["input_ids"], b["labels"], b["attention_mask"] if use_mask else None, method="loss",
                         chunk=chunk)
        return loss, {"n_tokens": n}

    optimizer = optax.adamw(cfg["lr"], b1=0.9, b2=0.999, eps=1e-8, weight_decay=cfg["weight_decay"])
    step = jlora.train.make_step(loss_fn, optimizer)
    opt_state = optimizer.init(trainable)
    mem_setup = device_memory()

    t0 = time.perf_counter()
    trainable, opt_state, metrics = jax.block_until_ready(step(trainable, frozen, opt_state, batch, None))
    first_call = time.perf_counter() - t0
    losses = [float(metrics["loss"])]
    n_tokens = int(metrics["n_tokens"])
    log(f"{variant}: first call {first_call:.2f} s, loss {losses[0]:.6f} ({n_tokens} target tokens)")
    for _ in range(cfg["warmup"]):
        trainable, opt_state, metrics = jax.block_until_ready(step(trainable, frozen, opt_state, batch, None))
        losses.append(float(metrics["loss"]))
    times = []
    for _ in range(cfg["steps"]):
        t0 = time.perf_counter()
        trainable, opt_state, metrics = jax.block_until_ready(step(trainable, frozen, opt_state, batch, None))
        times.append(time.perf_counter() - t0)
        losses.append(float(metrics["loss"]))
    out = {"variant": variant, "framework": "jlora", "status": "ok", "device": f"{dev.platform} {dev.device_kind}",
           "first_call_s": first_call, "first_step_loss": losses[0], "n_target_tokens": n_tokens,
           "losses": losses, "final_loss": losses[-1], "all_finite": bool(np.all(np.isfinite(losses))),
           **_stats(times), "setup_s": setup_s, **counts, "spec": repr(spec),
           "loss": f"jlora.lift(model.apply)(params, input_ids, labels, {'attention_mask' if use_mask else 'None'}, "
                   f"method='loss', chunk={chunk})",
           "device_memory_after_setup": mem_setup, "device_memory_end": device_memory()}
    dm = out["device_memory_end"]
    if dm and "peak_bytes_in_use" in dm:
        out["peak_bytes"], out["peak_kind"] = dm["peak_bytes_in_use"], "jax memory_stats()['peak_bytes_in_use']"
    if cfg["memory_analysis"]:
        # the timed step's program, lowered and compiled again ahead of time (jax's caches may
        # return the executable already built; the figures are the same either way)
        t0 = time.perf_counter()
        lowered = step.lower(trainable, frozen, opt_state, batch, None)
        t1 = time.perf_counter()
        compiled = lowered.compile()
        t2 = time.perf_counter()
        out["compiled_memory"] = compiled_memory(compiled)
        out["aot_trace_lower_s"], out["aot_compile_s"] = t1 - t0, t2 - t1
    if cfg.get("profile_steps"):
        from step_profile import jax_profile

        state = {"t": trainable, "o": opt_state}

        def run_step():
            state["t"], state["o"], _ = jax.block_until_ready(step(state["t"], frozen, state["o"], batch, None))

        hlo = step.lower(trainable, frozen, opt_state, batch, None).compile().as_text()
        trace_dir = os.path.join(cfg["workdir"], "profiles", variant)
        shutil.rmtree(trace_dir, ignore_errors=True)
        out["profile"] = jax_profile(run_step, cfg["profile_steps"], hlo, trace_dir, cfg["vocab"],
                                     step_ms=1e3 * out["step_s_median"])
        out["profile"]["trace_dir"] = trace_dir
    out["ru_maxrss_bytes"] = _maxrss_bytes()
    if "peak_bytes" not in out:
        out["peak_bytes"], out["peak_kind"] = out["ru_maxrss_bytes"], "ru_maxrss (host RSS high-water mark)"
    out["process_s"] = time.perf_counter() - t_start
    out["affinity"] = _affinity()
    out["xla_flags"] = os.environ.get("XLA_FLAGS")
    log(f"{variant}: step {1e3 * out['step_s_median']:.1f} ms (median of {len(times)}), "
        f"{cfg['tokens_per_step'] / out['step_s_median']:.0f} tok/s, peak {out['peak_bytes'] / 2**20:.0f} MiB")
    emit(out)


# ==========================================================================================
# child: a PEFT variant

def child_peft(cfg):
    t_start = time.perf_counter()
    variant = cfg["variant"]
    method = variant.split("-")[1]
    compiled = variant.endswith("-compile")
    import numpy as np
    import torch
    _set_torch_threads(cfg)
    if method == "qlora" and not torch.cuda.is_available():
        emit({"variant": variant, "framework": "peft", "status": "skipped",
              "reason": "bitsandbytes 4-bit (NF4) training needs CUDA; torch.cuda.is_available() is False"})
        return
    import peft
    import transformers
    from safetensors.numpy import load_file

    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    tdtype = getattr(torch, cfg["dtype"])
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    kw = dict(dtype=tdtype, attn_implementation=cfg["peft"]["attn_implementation"])
    if method == "qlora":
        kw["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=tdtype)
        kw["device_map"] = {"": 0}
    model = transformers.LlamaForCausalLM.from_pretrained(cfg["weights_dir"], **kw)
    if method != "qlora":
        model.to(dev)
    model.config.use_cache = False
    if cfg["peft"]["gradient_checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    lcfg = peft.LoraConfig(r=cfg["rank"], lora_alpha=cfg["alpha"], target_modules=list(PROJECTIONS),
                           lora_dropout=0.0, bias="none", use_dora=(method == "dora"), task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, lcfg)
    factors = load_file(os.path.join(cfg["weights_dir"], "lora.safetensors"))
    n_set = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                key = name.replace(".default.weight", ".weight")
                src = torch.from_numpy(factors[key])
                if tuple(src.shape) != tuple(p.shape):
                    raise AssertionError(f"{name}: file {tuple(src.shape)} vs PEFT {tuple(p.shape)}")
                p.copy_(src.to(p.dtype))
                n_set += 1
    if n_set != len(factors):
        raise AssertionError(f"set {n_set} PEFT LoRA tensors, the file has {len(factors)}")
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    counts = {"trainable_params": int(sum(p.numel() for p in trainable)),
              "trainable_bytes": int(sum(p.numel() * p.element_size() for p in trainable))}
    ids = torch.from_numpy(np.load(os.path.join(cfg["weights_dir"], "batch.npz"))["input_ids"]).to(dev)
    mask = torch.ones_like(ids)
    optimizer = torch.optim.AdamW(trainable, lr=cfg["lr"], betas=(0.9, 0.999), eps=1e-8,
                                  weight_decay=cfg["weight_decay"])
    fwd = torch.compile(model) if compiled else model
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    setup_s = time.perf_counter() - t0
    mem_setup = int(torch.cuda.memory_allocated()) if cuda else None
    log(f"{variant}: {'cuda ' + torch.cuda.get_device_name(0) if cuda else 'cpu'}, dtype {cfg['dtype']}, "
        f"attn {model.config._attn_implementation}, torch threads {torch.get_num_threads()}, compile {compiled}")

    def step():
        out = fwd(input_ids=ids, attention_mask=mask, labels=ids)
        out.loss.backward()
        with torch.profiler.record_function("optimizer"):   # a label for --profile; free otherwise
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return out.loss.detach()

    t0 = time.perf_counter()
    loss = step()
    sync()
    first_call = time.perf_counter() - t0
    losses = [float(loss)]
    log(f"{variant}: first call {first_call:.2f} s, loss {losses[0]:.6f}")
    for _ in range(cfg["warmup"]):
        losses.append(float(step()))
    times = []
    for _ in range(cfg["steps"]):
        sync()
        t0 = time.perf_counter()
        loss = step()
        sync()
        times.append(time.perf_counter() - t0)
        losses.append(float(loss))
    out = {"variant": variant, "framework": "peft", "status": "ok",
           "device": f"cuda {torch.cuda.get_device_name(0)}" if cuda else "cpu",
           "first_call_s": first_call, "first_step_loss": losses[0], "losses": losses, "final_loss": losses[-1],
           "all_finite": bool(np.all(np.isfinite(losses))), **_stats(times), "setup_s": setup_s, **counts,
           "attn_implementation": model.config._attn_implementation, "torch_compile": compiled,
           "torch_threads": torch.get_num_threads(), "optimizer": repr(optimizer).replace("\n", " "),
           "cuda_memory_after_setup": mem_setup}
    out["ru_maxrss_bytes"] = _maxrss_bytes()
    if cuda:
        out["peak_bytes"], out["peak_kind"] = int(torch.cuda.max_memory_allocated()), "torch.cuda.max_memory_allocated()"
        out["cuda_max_memory_reserved"] = int(torch.cuda.max_memory_reserved())
    else:
        out["peak_bytes"], out["peak_kind"] = out["ru_maxrss_bytes"], "ru_maxrss (host RSS high-water mark)"
    if cfg.get("profile_steps"):
        from step_profile import torch_profile

        out["profile"] = torch_profile(lambda: (step(), sync()), cfg["profile_steps"], cfg["vocab"],
                                       step_ms=1e3 * out["step_s_median"])
    out["process_s"] = time.perf_counter() - t_start
    out["affinity"] = _affinity()
    log(f"{variant}: step {1e3 * out['step_s_median']:.1f} ms (median of {len(times)}), "
        f"{cfg['tokens_per_step'] / out['step_s_median']:.0f} tok/s, peak {out['peak_bytes'] / 2**20:.0f} MiB")
    emit(out)


def child_main(args):
    cfg = json.loads(args.child_config)
    if args.child == "probe":
        return child_probe(cfg)
    if args.child == "prepare":
        return child_prepare(cfg)
    if args.child == "jlora":
        return child_jlora(cfg)
    if args.child == "peft":
        return child_peft(cfg)
    raise SystemExit(f"unknown child {args.child!r}")


# ==========================================================================================
# parent

def available(variant, probe):
    """None when ``variant`` can run here, else the reason it cannot."""
    if variant.startswith("jlora") and not probe.get("version_jax"):
        return "jax is not installed"
    if variant.startswith("peft"):
        for dist in ("torch", "transformers", "peft"):
            if not probe.get("version_" + dist):
                return f"{dist} is not installed"
    if variant == "peft-qlora":
        if not probe.get("torch_cuda"):
            return "bitsandbytes 4-bit (NF4) training needs CUDA; torch.cuda.is_available() is False"
        if not probe.get("version_bitsandbytes"):
            return "bitsandbytes is not installed"
    return None


def merge_rounds(rs):
    """One variant's results over ``--rounds`` processes: step times pooled, first calls listed."""
    ok = [r for r in rs if r.get("status") == "ok"]
    if not ok:
        return rs[-1]
    out = dict(ok[0])
    if len(rs) > 1:
        times = [t for r in ok for t in r["step_s_all"]]
        out.update(_stats(times))
        out["first_call_s_all"] = [r["first_call_s"] for r in ok]
        out["peak_bytes"] = max(r["peak_bytes"] for r in ok)
        out["rounds_ok"] = len(ok)
        out["rounds_failed"] = [r for r in rs if r.get("status") != "ok"]
    return out


def peak_for(probe, cfg, args):
    if args.peak_tflops is not None:
        return args.peak_tflops, "--peak-tflops"
    name = (probe.get("gpu_name") or probe.get("jax_device_kind") or "")
    if probe.get("jax_backend") == "gpu" or probe.get("torch_cuda"):
        if any(x in name.upper() for x in ("H100", "H200")) and cfg["dtype"] in ("bfloat16", "float16"):
            return 989.0, f"{name}: 989 TFLOP/s dense {cfg['dtype']} (NVIDIA H100/H200 SXM datasheet)"
    return None, None


def finish_results(results, cfg, flops, peak):
    tokens = cfg["tokens_per_step"]
    for r in results.values():
        if r.get("status") != "ok":
            continue
        r["tokens_per_s"] = tokens / r["step_s_median"]
        r["model_flops_per_step"] = flops["model_flops_per_step"]
        r["achieved_tflops"] = flops["model_flops_per_step"] / r["step_s_median"] / 1e12
        r["mfu"] = r["achieved_tflops"] / peak if peak else None


def ratios(results):
    out = {}
    for m in ("lora", "dora", "qlora"):
        j = results.get(f"jlora-{m}", {})
        if j.get("status") != "ok":
            continue
        for ref, key in ((f"peft-{m}", "vs_peft_eager"), (f"peft-{m}-compile", "vs_peft_compiled")):
            r = results.get(ref, {})
            if r.get("status") != "ok":
                continue
            out.setdefault(f"jlora-{m}", {})[key] = {
                "reference": ref,
                "tokens_per_s": j["tokens_per_s"] / r["tokens_per_s"],
                "step_time": j["step_s_median"] / r["step_s_median"],
                "step_time_min": j["step_s_min"] / r["step_s_min"],
                "peak_bytes": j["peak_bytes"] / r["peak_bytes"] if j.get("peak_bytes") and r.get("peak_bytes") else None,
                "first_call": j["first_call_s"] / r["first_call_s"],
                "first_step_loss_abs_diff": abs(j["first_step_loss"] - r["first_step_loss"]),
            }
    return out


def loss_check(results, cfg):
    rtol = LOSS_RTOL[cfg["dtype"]]
    out = {"pairs": {}, "rtol": rtol, "required": "jlora-lora vs peft-lora",
           "lora_b": (f"random, N(0, {cfg['lora_b_std']}^2), the same A and B in both frameworks: the low-rank path "
                      f"contributes to the loss" if cfg["lora_b_std"] else
                      "0 (PEFT's init): the first loss equals the base model's")}
    for m in ("lora", "dora", "qlora"):
        j, p = results.get(f"jlora-{m}", {}), results.get(f"peft-{m}", {})
        if j.get("status") != "ok" or p.get("status") != "ok":
            out["pairs"][m] = {"checked": False}
            continue
        a, b = j["first_step_loss"], p["first_step_loss"]
        rel = abs(a - b) / abs(b)
        out["pairs"][m] = {"checked": True, "jlora": a, "peft": b, "abs_diff": abs(a - b), "rel_diff": rel,
                           "within_rtol": rel <= rtol}
        # compiled PEFT computes the same function: its first loss should match eager PEFT's
        c = results.get(f"peft-{m}-compile", {})
        if c.get("status") == "ok":
            out["pairs"][m]["peft_compile"] = c["first_step_loss"]
            out["pairs"][m]["peft_compile_rel_diff_vs_jlora"] = abs(a - c["first_step_loss"]) / abs(c["first_step_loss"])
    lora = out["pairs"]["lora"]
    out["passed"] = lora["within_rtol"] if lora.get("checked") else None
    out["max_abs_diff"] = max((v["abs_diff"] for v in out["pairs"].values() if v.get("checked")), default=None)
    out["note"] = ("dora and qlora are recorded, not enforced: PEFT's DoRA takes the weight norm of W0 + s*B@A in "
                   "the base dtype; bitsandbytes and jlora quantise the same bf16 weights to NF4 but round "
                   "their double-quantised scales on their own")
    return out


def write_report(out_path, report):
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    tmp = out_path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(report, fh, indent=2)
        fh.write("\n")
    os.replace(tmp, out_path)


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        return child_main(args)
    t_start = time.perf_counter()
    deadline = None if args.deadline is None else t_start + args.deadline
    load_start = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    os.makedirs(args.workdir, exist_ok=True)
    log_dir = args.log_dir or os.path.join(args.workdir, "logs")
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")

    probe, pinfo = run_child("probe", {}, 300, os.path.join(log_dir, f"{stamp}-probe.log"))
    if probe is None:
        raise SystemExit(f"the probe child failed:\n{pinfo['output_tail']}")
    cfg = resolve(args, probe)
    backend = probe.get("jax_backend") or ("gpu" if probe.get("torch_cuda") else "cpu")
    flops = flop_count(cfg)
    peak, peak_src = peak_for(probe, cfg, args)
    log(f"{backend} ({probe.get('gpu_name') or probe.get('cpu_model')}): preset {cfg['preset']} hidden {cfg['hidden']} "
        f"layers {cfg['layers']} intermediate {cfg['intermediate']} vocab {cfg['vocab']} heads "
        f"{cfg['heads']}/{cfg['kv_heads']}, batch {cfg['batch']} x {cfg['seq']}; {cfg['dtype']}; jlora "
        f"{cfg['jlora']}; threads {cfg['threads']} cores {cfg['cores']}")

    wanted = args.variants or VARIANTS
    results, order = {}, []
    for v in wanted:
        why = available(v, probe)
        if why:
            results[v] = {"variant": v, "status": "skipped", "reason": why}
            log(f"{v}: skipped ({why})")
        else:
            order.append(v)

    cfg["weights_dir"] = os.path.join(args.workdir, "weights-" + weights_key(cfg))
    cfg["workdir"] = args.workdir
    prep, prep_info = run_child("prepare", cfg, max(args.timeout, 900), os.path.join(log_dir, f"{stamp}-prepare.log"),
                                jax_cpu=True)
    if prep is None:
        raise SystemExit(f"the prepare child failed:\n{prep_info['output_tail']}")
    log(f"weights: {prep['params']:,} parameters in {cfg['dtype']} at {prep['weights_dir']} "
        f"({'cached' if prep['cached'] else 'made in %.0f s' % prep_info['wall_s']})")

    def report():
        finish_results(merged, cfg, flops, peak)
        machine = {k: v for k, v in probe.items()}
        machine["loadavg_start"] = load_start
        machine["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
        code = {}
        try:
            git = lambda *a: subprocess.run(["git", "-C", ROOT, *a], capture_output=True, text=True, timeout=10,
                                            check=True).stdout.strip()
            code = {"git_commit": git("rev-parse", "HEAD"), "jlora_dirty": bool(git("status", "--porcelain", "--", "jlora"))}
        except (OSError, subprocess.SubprocessError):
            pass
        return {
            "benchmark": TAG,
            "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join([os.path.basename(sys.executable), "benchmarks/llama_step.py", *sys.argv[1:]])
            if argv is None else None,
            "backend": backend, "machine": machine, "code": code, "config": cfg,
            "weights": {k: v for k, v in prep.items() if k != "hf_config"}, "hf_config": prep.get("hf_config"),
            "flops": {**flops, "peak_tflops": peak, "peak_source": peak_src,
                      "how": "model FLOPs = 4*N*T (forward 2NT + backward w.r.t. activations 2NT, no frozen-weight "
                             "gradient; N = non-embedding params + lm_head) + attention (forward 4*B*S^2*hidden*L/2, "
                             "causal = half; backward 2x forward) + 6*N_adapter*T. The same count for every "
                             "variant (DoRA's norm and QLoRA's dequantisation are not counted)"},
            "results": merged, "ratios": ratios(merged), "first_step_loss_check": loss_check(merged, cfg),
            "children": child_info, "wall_s": time.perf_counter() - t_start,
        }

    out_path = args.out or os.path.join(HERE, "results", f"{TAG}_{backend}.json")
    per_round, child_info = {v: [] for v in order}, {}
    merged = dict(results)
    for rnd in range(args.rounds):
        for v in order:
            kind = "jlora" if v.startswith("jlora") else "peft"
            timeout = args.timeout
            if v.endswith("-compile") and args.compile_timeout is not None:
                timeout = args.compile_timeout
            if deadline is not None:
                left = deadline - time.perf_counter()
                if left < 30:
                    per_round[v].append({"variant": v, "status": "skipped", "reason": f"--deadline {args.deadline} s reached"})
                    merged[v] = merge_rounds(per_round[v])
                    log(f"{v}: skipped (--deadline reached)")
                    continue
                timeout = min(timeout, left)
            log(f"{v}: starting" + (f" (round {rnd + 1}/{args.rounds})" if args.rounds > 1 else "")
                + f", timeout {timeout:.0f} s")
            res, info = run_child(kind, {**cfg, "variant": v}, timeout,
                                  os.path.join(log_dir, f"{stamp}-{v}-r{rnd}.log"))
            child_info[f"{v}/round{rnd}"] = {k: info[k] for k in ("rc", "wall_s", "timed_out", "log")}
            if res is None or info["rc"] not in (0, None):
                status = "timeout" if info["timed_out"] else "failed"
                res = {"variant": v, "status": status, "rc": info["rc"], "wall_s": info["wall_s"],
                       "error": info["output_tail"][-3000:]}
                log(f"{v}: {status.upper()} (rc {info['rc']}, {info['wall_s']:.0f} s); log {info['log']}\n"
                    + "\n".join("    " + l for l in info["output_tail"].strip().splitlines()[-12:]))
            else:
                res["process_wall_s"] = info["wall_s"]
            per_round[v].append(res)
            merged[v] = merge_rounds(per_round[v])
            write_report(out_path, report())   # after every child: a later crash or kill keeps what ran

    rep = report()
    write_report(out_path, rep)
    print()
    log(f"{'variant':18s} {'status':8s} {'step ms':>9s} {'tok/s':>9s} {'peak MiB':>9s} {'first s':>8s} "
        f"{'loss0':>10s} {'MFU':>6s}")
    for v in wanted:
        r = rep["results"].get(v, {})
        if r.get("status") == "ok":
            log(f"{v:18s} {'ok':8s} {1e3 * r['step_s_median']:9.1f} {r['tokens_per_s']:9.0f} "
                f"{r['peak_bytes'] / 2**20:9.0f} {r['first_call_s']:8.1f} {r['first_step_loss']:10.6f} "
                + (f"{100 * r['mfu']:5.1f}%" if r.get("mfu") else "     -"))
        else:
            lines = [l.strip() for l in (r.get("error") or "").splitlines() if l.strip()]
            raised = [l for l in lines if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt)\b", l)]
            why = r.get("reason") or (raised or lines or [""])[-1]
            log(f"{v:18s} {r.get('status', '?'):8s} {why[:150]}")
    for j, rr in rep["ratios"].items():
        for key, x in rr.items():
            log(f"{j} {key} ({x['reference']}): tokens/s x{x['tokens_per_s']:.3f}, peak x"
                + (f"{x['peak_bytes']:.3f}" if x["peak_bytes"] else "-"))
    chk = rep["first_step_loss_check"]
    for m, pr in chk["pairs"].items():
        if pr.get("checked"):
            log(f"first-step loss {m}: jlora {pr['jlora']:.6f} peft {pr['peft']:.6f} rel diff {pr['rel_diff']:.2e} "
                f"(rtol {chk['rtol']}{', enforced' if m == 'lora' else ''})")
    if args.profile:
        from step_profile import table
        print(table([rep["results"][v] for v in wanted if v in rep["results"]]))
    log(f"wrote {out_path} ({rep['wall_s']:.0f} s)")
    if chk["passed"] is False:
        log("FAILED: the first-step losses of jlora-lora and peft-lora differ by more than rtol")
        sys.exit(1)
    return rep


if __name__ == "__main__":
    main()
