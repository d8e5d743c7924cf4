"""benchmarks/llama_step.py at its tiny --smoke shape: jlora's Llama and PEFT on transformers' Llama
load the same weights and factors, their first-step losses agree (the script fails otherwise), and
the report has the fields benchmarks/README.md's table is read from. Not a measurement."""

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
