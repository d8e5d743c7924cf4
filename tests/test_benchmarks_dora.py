"""benchmarks/dora_step.py on a tiny model, one step per variant: the DoRA variants' losses agree
and the report has the keys the README's table is read from.

The benchmark's core (``dora_step.run``) runs in a subprocess so that XLA:CPU can be told to
skip its backend optimisations (``--xla_backend_optimization_level=0``: about half the compile
time, and compiling four training steps is nearly all of this test's cost); numbers measured
that way are not benchmark results, and this test only checks losses and the report's shape.
"""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")

SCRIPT = r"""
import sys
sys.path.insert(0, sys.argv[1])
import dora_step
args = dora_step.parse_args(["--d-model", "16", "--layers", "1", "--heads", "2", "--mlp-ratio", "2",
                             "--vocab", "32", "--seq", "8", "--batch", "2", "--rank", "2", "--warmup", "0",
                             "--no-compile-split"])  # one compile per variant
args.steps = 1
dora_step.write_report(dora_step.run(args, warm_up=False), sys.argv[2])
"""

VARIANTS = ("lora", "dora", "dora_peft", "dora_merge")


def test_dora_step_tiny(tmp_path):
    out = tmp_path / "dora_step_cpu.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip())
    proc = subprocess.run([sys.executable, "-c", SCRIPT, BENCH, str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out) as fh:
        report = json.load(fh)

    assert set(report) >= {"benchmark", "machine", "code", "config", "results", "ratios",
                           "first_step_loss_check", "dora_peft_norm"}
    assert report["benchmark"] == "dora_step"
    assert {"jax", "backend", "cpu_count", "loadavg_start"} <= set(report["machine"])
    assert set(report["results"]) == set(VARIANTS)
    for v, r in report["results"].items():
        assert {"first_call_s", "first_step_loss", "step_s_median", "step_s_min", "tokens_per_s",
                "losses"} <= set(r), v
        assert {"temp_size_in_bytes", "xla_flops"} <= set(r["compiled_memory"]), v
    assert set(report["ratios"]) == {"dora/lora", "dora_peft/lora", "dora_merge/lora",
                                     "dora_peft/dora", "dora_merge/dora"}
    for name, ratio in report["ratios"].items():
        assert {"step_time", "step_time_min", "tokens_per_s", "temp_size_in_bytes", "xla_flops"} <= set(ratio), name
    # the PEFT-style norm really replaced jlora's while dora_peft was traced
    assert report["dora_peft_norm"]["calls_while_tracing_phase1"] > 0

    loss = {v: report["results"][v]["first_step_loss"] for v in VARIANTS}
    assert loss["dora_peft"] == pytest.approx(loss["dora"], rel=1e-4)
    assert loss["dora_merge"] == pytest.approx(loss["dora"], rel=1e-4)
    assert report["first_step_loss_check"]["max_rel_diff"] <= 1e-4
    # B != 0, so DoRA's gain acts: its loss is not LoRA's
    assert loss["lora"] != pytest.approx(loss["dora"], rel=1e-6)
    # PEFT's norm forms A @ B for every kernel: more flops than the closed form
    flops = {v: report["results"][v]["compiled_memory"]["xla_flops"] for v in VARIANTS}
    assert flops["dora_peft"] > flops["dora"]
