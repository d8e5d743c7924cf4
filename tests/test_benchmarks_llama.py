"""benchmarks/llama_step.py at its tiny --smoke shape: jlora's Llama and PEFT on transformers' Llama
load the same weights and factors, their first-step losses agree (the script fails otherwise), and
the report has the fields benchmarks/README.md's table is read from, and ``--profile`` attributes each
framework's step to the categories of benchmarks/step_profile.py. Not a measurement."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_llama_step_smoke(tmp_path):
    out = tmp_path / "llama_step.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "llama_step.py"), "--smoke",
                           "--variants", "jlora-lora,peft-lora", "--steps", "1", "--warmup", "0", "--loss-chunk", "4",
                           "--profile", "1",
                           "--workdir", str(tmp_path / "work"), "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = report["results"]
    for name in ("jlora-lora", "peft-lora"):
        assert rows[name]["status"] == "ok", rows[name]
        assert rows[name]["tokens_per_s"] > 0 and rows[name]["step_s_median"] > 0
    assert report["ratios"]["jlora-lora"]["vs_peft_eager"]["tokens_per_s"] > 0
    check = report["first_step_loss_check"]
    assert check["passed"] is True and check["pairs"]["lora"]["rel_diff"] < 1e-3, check
    # the profile: every executed HLO instruction is found in the compiled program (nothing of
    # substance unmatched), the matmuls and the optimizer are seen, and in both frameworks
    for name in ("jlora-lora", "peft-lora"):
        prof = rows[name]["profile"]
        ms = prof["ms_per_step"]
        assert set(ms) == {"head matmul", "layer matmuls", "attention core", "loss", "elementwise", "layout copies",
                           "optimizer", "other"}, ms
        assert ms["layer matmuls"] > 0 and ms["head matmul"] > 0 and ms["optimizer"] > 0, (name, ms)
        assert prof["attributed_ms_per_step"] > 0 and prof["top_ops"], prof
    jl = rows["jlora-lora"]["profile"]
    assert sum(jl["unmatched_events_ms_per_step"].values()) < 0.5 * jl["attributed_ms_per_step"], jl


def test_hlo_flop_count_and_profile_categories():
    """benchmarks/gpu_aot.py's HLO reader counts every dot times its loop's trip count (forward and
    both backward products of a scanned matmul: 3 x 5 x 2MNK), and benchmarks/step_profile.py files
    each instruction of the same program under the category its name stack says."""
    import jax
    import jax.numpy as jnp

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import gpu_aot
    import step_profile

    def f(x, ws):
        def body(h, w):
            return jnp.tanh(h @ w), None
        return jax.lax.scan(body, x, ws)[0].sum()

    x, ws = jnp.ones((8, 16)), jnp.ones((5, 16, 16))
    text = jax.jit(jax.grad(f, argnums=1)).lower(x, ws).compile().as_text()
    hlo = gpu_aot.Hlo(text)
    assert hlo.flops()["dot_flops"] == 3 * 5 * 2 * 8 * 16 * 16
    assert hlo.flops()["unknown_trip_counts"] == 0
    instrs, parsed = step_profile.index_hlo(text)
    cats = {step_profile.classify_hlo(n, instrs, parsed, vocab=32000) for n in instrs}
    assert "parent" in cats                                        # the while loops: their bodies count
    dots = [n for n, i in instrs.items() if i["op"] == "dot" or (i["op"] == "fusion" and step_profile._contains(
        parsed, i, {"dot"}))]
    assert dots and all(step_profile.classify_hlo(n, instrs, parsed, 32000).endswith("matmul") for n in dots)
