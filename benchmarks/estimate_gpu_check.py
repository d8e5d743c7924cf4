"""jlora.estimate against the measured peak of real training steps on one GPU: for three sizes, a
fresh process materialises the model (random weights, the shapes are what matter), runs three
jlora training steps and reads ``memory_stats()["peak_bytes_in_use"]``; beside it the analytic and
the compiled figure for the same step. One process per size, so each peak is its own.

    python benchmarks/estimate_gpu_check.py --out benchmarks/results/estimate_gpu_check.json   # ~3 min on an H100/H200

On a machine without a GPU it stops (``--allow-cpu`` runs the same code path on CPU with a small
shape and reports no measured peak, which is how the suite-less path is checked).
"""

import argparse
import json
import os
import subprocess
import sys
import time

#: (name, model, method, batch, seq): three sizes on one 80-141 GB GPU, bf16 weights and compute, remat
SIZES = [
    ("smollm2-135m lora 8x1024", "smollm2-135m", "lora", 8, 1024),
    ("llama-3.2-1b lora 4x2048", "llama-3.2-1b", "lora", 4, 2048),
    ("llama-3.1-8b qlora 2x1024", "llama-3.1-8b", "qlora", 2, 1024),
]
CPU_SIZES = [("smollm2-135m lora 1x128 (cpu)", "smollm2-135m", "lora", 1, 128)]


def one(model, method, batch, seq):
    """Runs in its own process: estimate, compile, train three steps, read the peak."""
    import jax
    import jax.numpy as jnp
    import optax

    import jlora
    from jlora import planner
    from jlora.models import llama
    from jlora.train import make_step

    cls = {"lora": jlora.LoRA, "qlora": jlora.QLoRA}[method]
    spec = cls(rank=16, alpha=32.0, targets=planner.ALL_LINEAR)
    dtype = "bfloat16"
    est = planner.estimate(model, spec, batch=batch, seq=seq, remat=True, param_dtype=dtype, compute_dtype=dtype,
                           compile=True)
    _, config = planner.model_config(model)
    config = config.replace(scan_layers=True, remat=True, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    net = llama.LlamaForCausalLM(config)
    params = jax.jit(net.init_params)(jax.random.key(0))
    adapted = jlora.apply(params, spec, key=jax.random.key(1), model=net.apply,
                          example=(jnp.zeros((1, 8), jnp.int32),))
    del params
    trainable, frozen = jlora.partition(adapted)
    del adapted
    optimizer = optax.adamw(1e-4)
    step = make_step(planner._loss_fn(net), optimizer)
    opt_state = optimizer.init(trainable)
    ids = jax.random.randint(jax.random.key(2), (batch, seq), 0, config.vocab_size)
    batch_ = {"input_ids": ids, "labels": ids}
    t0 = time.perf_counter()
    for _ in range(3):
        trainable, opt_state, metrics = step(trainable, frozen, opt_state, batch_)
    loss = float(metrics["loss"])
    stats = jax.devices()[0].memory_stats()
    return {"analytic": est.peak, "compiled": est.compiled["peak"], "loss": loss,
            "measured_peak": None if stats is None else int(stats["peak_bytes_in_use"]),
            "device": jax.devices()[0].device_kind, "seconds": time.perf_counter() - t0}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out")
    p.add_argument("--allow-cpu", action="store_true")
    p.add_argument("--one", nargs=4, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.one:
        model, method, batch, seq = a.one
        print(json.dumps(one(model, method, int(batch), int(seq))))
        return
    import jax

    if jax.default_backend() != "gpu" and not a.allow_cpu:
        sys.exit(f"needs a GPU (the backend is {jax.default_backend()}); --allow-cpu checks the code path on CPU")
    sizes = SIZES if jax.default_backend() == "gpu" else CPU_SIZES
    env = dict(os.environ, XLA_PYTHON_CLIENT_MEM_FRACTION="0.95", XLA_PYTHON_CLIENT_PREALLOCATE="false")
    rows = []
    for name, model, method, batch, seq in sizes:
        run = subprocess.run([sys.executable, __file__, "--one", model, method, str(batch), str(seq)],
                             capture_output=True, text=True, env=env, timeout=900)
        if run.returncode:
            rows.append({"name": name, "error": run.stderr[-2000:]})
            print(name, "FAILED", run.stderr[-500:], flush=True)
            continue
        r = json.loads(run.stdout.strip().splitlines()[-1])
        if r["measured_peak"]:
            r["analytic_error"] = (r["analytic"] - r["measured_peak"]) / r["measured_peak"]
            r["compiled_error"] = (r["compiled"] - r["measured_peak"]) / r["measured_peak"]
        rows.append({"name": name, **r})
        print(json.dumps(rows[-1]), flush=True)
    result = {"benchmark": "estimate_gpu_check", "rows": rows, "date": time.strftime("%Y-%m-%d")}
    if a.out:
        with open(a.out, "w") as f:
            f.write(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
