"""How close is jlora.estimate's analytic figure to the compiler's? A grid of Llama shapes (135M to
70B) x methods x ranks x batch x seq x remat x meshes, each estimated (no compile) and compiled on
abstract inputs (XLA's memory analysis of the real jlora step), the error of the peak per device
reported per point; and the README's table (``--table``): 1B / 3B / 8B / 70B x LoRA / QLoRA / DoRA
on one 24 GB card, one 80 GB card, one 141 GB card, v5e-8 and v5e-64, beside the field's rule of
thumb.

    .venv/bin/python benchmarks/estimate_memory.py --out benchmarks/results/estimate_memory_cpu.json
    .venv/bin/python benchmarks/estimate_memory.py --table --out benchmarks/results/estimate_table.json

Runs on 8 fake CPU devices (set here); nothing is materialised, so 70B shapes compile on a laptop.
"""

import argparse
import os
import sys

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import json  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402

import jlora  # noqa: E402
from jlora import planner  # noqa: E402

GiB = 2 ** 30
SHAPES = ["smollm2-135m", "llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b", "mistral-7b", "qwen2.5-7b", "llama-3.1-70b"]
MESHES = [None, "data=8", "data=2,fsdp=4", "fsdp=8", "fsdp=4,tensor=2"]
METHODS = {"lora": jlora.LoRA, "qlora": jlora.QLoRA, "dora": jlora.DoRA}


def spec(method, rank):
    return METHODS[method](rank=rank, alpha=2.0 * rank, targets=planner.ALL_LINEAR)


def grid(n, seed, dtype):
    """``n`` random points (model, method, rank, batch, seq, remat, mesh, dtype, loss chunk),
    reproducible from ``seed``."""
    rng = random.Random(seed)
    points = []
    while len(points) < n:
        model, method, rank = rng.choice(SHAPES), rng.choice(list(METHODS)), rng.choice([8, 16, 64])
        seq, remat, mesh = rng.choice([256, 512, 1024, 2048]), rng.random() < 0.6, rng.choice(MESHES)
        batch = 8 * rng.choice([1, 2]) if mesh else rng.choice([1, 2, 4, 8])
        if model == "llama-3.1-70b" and not mesh:
            batch = min(batch, 2)
        chunk = rng.choice([None, None, 256, 512])
        points.append((model, method, rank, batch, seq, remat, mesh, dtype, chunk))
    return points


def agreement(points):
    rows = []
    for model, method, rank, batch, seq, remat, mesh, dtype, chunk in points:
        t0 = time.perf_counter()
        e = planner.estimate(model, spec(method, rank), batch=batch, seq=seq, remat=remat, mesh=mesh,
                             param_dtype=dtype, compute_dtype=dtype, loss_chunk=chunk, compile=True)
        rows.append({"model": model, "method": method, "rank": rank, "batch": batch, "seq": seq, "remat": remat,
                     "mesh": mesh, "dtype": dtype, "loss_chunk": chunk, "analytic_gib": e.peak / GiB, "compiled_gib": e.compiled["peak"] / GiB,
                     "error": e.error, "parts_gib": {k: v / GiB for k, v in e.parts.items()},
                     "compiled": e.compiled, "seconds": time.perf_counter() - t0})
        print(f"{model:14s} {method:5s} r{rank:<3d} {batch:2d}x{seq:<5d} remat={remat!s:5s} {str(mesh):16s} {dtype:8s} chunk={chunk!s:4s} "
              f"analytic {e.peak / GiB:8.2f} GiB  compiled {e.compiled['peak'] / GiB:8.2f} GiB  {100 * e.error:+6.1f} %",
              flush=True)
    return rows


#: the README table: bf16 weights and compute, remat, 4 sequences of 2048 tokens per device, r=16 on
#: every projection, AdamW; FSDP over a slice's chips
TABLE_MODELS = ["llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b", "llama-3.1-70b"]
TABLE_HARDWARE = ["rtx4090", "h100-80g", "h200", "v5e-8", "v5e-64"]


def table(per_device=4, seq=2048, loss_chunk=None):
    rows = []
    for model in TABLE_MODELS:
        for method in METHODS:
            row = {"model": model, "method": method, "cells": {}}
            for name in TABLE_HARDWARE:
                hw = planner.hardware(name)
                v = planner.plan(model, spec(method, 16), hardware=hw, batch=per_device * hw.devices, seq=seq,
                                 remat=True, param_dtype="bfloat16", compute_dtype="bfloat16", loss_chunk=loss_chunk,
                                 suggest=False,
                                 search_seq=False)
                row["cells"][name] = {"peak_gib": v.estimate.peak / GiB, "fits": v.fits, "usable_gib": hw.usable / GiB,
                                      "largest_batch_per_device": v.largest_batch // hw.devices,
                                      "rule_of_thumb_gib": planner.rule_of_thumb(v.estimate) / GiB}
            rows.append(row)
            print(model, method, {k: round(c["peak_gib"], 1) for k, c in row["cells"].items()}, flush=True)
    return rows


def markdown(rows) -> str:
    head = "| model | method | " + " | ".join(TABLE_HARDWARE) + " |"
    lines = [head, "|" + "---|" * (2 + len(TABLE_HARDWARE))]
    for row in rows:
        cells = []
        for name in TABLE_HARDWARE:
            c = row["cells"][name]
            most = c["largest_batch_per_device"] or "none"
            cells.append(f"{c['peak_gib']:.1f} ({c['rule_of_thumb_gib']:.1f}) {'yes' if c['fits'] else '**no**'}, max {most}")
        lines.append(f"| {row['model']} | {row['method']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--points", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", help="float32 (XLA:CPU computes it natively) or bfloat16")
    p.add_argument("--table", action="store_true", help="the README table instead of the agreement grid")
    p.add_argument("--loss-chunk", type=int, default=None, help="--table: with the loss this many positions at a time")
    p.add_argument("--out")
    a = p.parse_args(argv)
    if len(jax.devices()) < 8:
        sys.exit(f"needs 8 devices, have {len(jax.devices())}")
    t0 = time.perf_counter()
    machine = {"backend": jax.default_backend(), "devices": f"{len(jax.devices())} x {jax.devices()[0].device_kind}",
               "cpu": platform.processor() or platform.machine(), "jax": jax.__version__}
    if a.table:
        rows = table(loss_chunk=a.loss_chunk)
        result = {"benchmark": "estimate_table", "what": "analytic peak GiB per device (rule of thumb), fits?, largest "
                  "batch per device; bf16, remat, 4 x 2048 tokens per device, r=16 all projections, AdamW"
                  + (f", loss chunk {a.loss_chunk}" if a.loss_chunk else ""), "loss_chunk": a.loss_chunk,
                  "machine": machine, "rows": rows, "markdown": markdown(rows)}
        print(result["markdown"])
    else:
        rows = agreement(grid(a.points, a.seed, a.dtype))
        errors = [abs(r["error"]) for r in rows]
        result = {"benchmark": "estimate_memory", "what": "analytic vs compiled (XLA memory analysis) peak bytes per "
                  "device of jlora's training step", "machine": machine, "rows": rows,
                  "max_abs_error": max(errors), "mean_abs_error": sum(errors) / len(errors),
                  "within_10_percent": sum(e < 0.10 for e in errors), "points": len(rows)}
        print(f"max |error| {100 * result['max_abs_error']:.1f} %, mean {100 * result['mean_abs_error']:.1f} %, "
              f"{result['within_10_percent']}/{len(rows)} within 10 %")
    result["wall_s"] = time.perf_counter() - t0
    if a.out:
        with open(a.out, "w") as f:
            f.write(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
