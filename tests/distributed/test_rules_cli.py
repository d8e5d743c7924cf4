"""The models' logical partition rules, rule files, and the CLI's --mesh / --rules / --dry-run."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import pytest
from jax.sharding import PartitionSpec as P

from jlora import cli
from jlora.distributed import load_rules, make_mesh, resolve_rules
from jlora.models.bert import BertConfig
from jlora.models.llama import LlamaConfig

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_resolve_drops_axes_the_mesh_lacks():
    rules = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, scan_layers=True).partition_rules()
    mesh = make_mesh((1,), ("fsdp",))
    got = dict(resolve_rules(rules, mesh))
    assert got[r"self_attn/[qkv]_proj/kernel$"] == P(None, "fsdp", None)        # layers, embed, heads(tensor: absent)
    assert got[r"mlp/down_proj/kernel$"] == P(None, None, "fsdp")
    assert got[r"model/embed_tokens/embedding$"] == P(None, "fsdp")
    both = dict(resolve_rules(rules, make_mesh((1, 1), ("fsdp", "tensor"))))
    assert both[r"self_attn/[qkv]_proj/kernel$"] == P(None, "fsdp", "tensor")
    # one mesh axis splits one array axis: a map sending two logical axes to fsdp keeps the first
    same = dict(resolve_rules(rules, mesh, {"embed": "fsdp", "heads": "fsdp", "mlp": "fsdp", "vocab": None, "layers": None}))
    assert same[r"self_attn/[qkv]_proj/kernel$"] == P(None, "fsdp", None)
    with pytest.raises(ValueError, match="'vocab' is not in the axis map"):
        resolve_rules(rules, mesh, {"embed": "fsdp"})
    unrolled = dict(BertConfig(scan_layers=False).partition_rules())
    assert unrolled[r"attention/self/(query|key|value)/kernel$"] == ("embed", "heads")


def test_rules_file(tmp_path):
    f = tmp_path / "rules.json"
    f.write_text(json.dumps([["kernel$", ["fsdp", None]], ["embedding$", [["data", "fsdp"]]]]))
    assert load_rules(f) == [("kernel$", P("fsdp", None)), ("embedding$", P(("data", "fsdp")))]
    for bad, match in (([["(", []]], "not a valid regex"), ({"a": 1}, "JSON list"), ([["x", [3]]], "spec entry")):
        f.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=match):
            load_rules(f)
    f.write_text("[")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_rules(f)


@pytest.mark.parametrize("mesh,match", [("data", "not name=size"), ("data=x", "not an integer"),
                                        ("data=0", "not positive"), ("data=2,data=4", "named twice"),
                                        ("data=-1,fsdp=-1", "at most one")])
def test_bad_mesh_flags(mesh, match):
    with pytest.raises(SystemExit, match=match):
        cli.load_config({"mesh": mesh})
    with pytest.raises(SystemExit, match="--rules needs --mesh"):
        cli.load_config({"rules": "r.json"})


def test_dry_run_on_eight_devices(tmp_path):
    """``jlora train --mesh data=2,fsdp=4 --dry-run`` on a tiny Llama directory: per-device shapes by
    the model's rules and the compiled step's memory; no run directory."""
    from tests._local_models import write_llama_dir

    model = write_llama_dir(tmp_path / "my_llama")
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i} plus one?", "response": str(i + 1)}) + "\n" for i in range(24)))
    env = {**os.environ, "JAX_PLATFORMS": "cpu",   # the suite's XLA flags (conftest) and 8 devices
           "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip(),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out = tmp_path / "run"
    args = ["train", "--model", str(model), "--data", str(data), "--batch", "8", "--max-length", "32"]
    proc = subprocess.run([sys.executable, "-c", "import sys; from jlora.cli import main; sys.exit(main())", *args,
                           "--mesh", "data=2,fsdp=4", "--dry-run", "--out", str(out)],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    q_a = [l for l in lines if "layers_0']['self_attn']['q_proj']['kernel'].a" in l]
    assert q_a and "(32, 8)" in q_a[0] and "per device (8, 8)" in q_a[0] and "('fsdp', None)" in q_a[0]
    embed = [l for l in lines if "embed_tokens" in l]
    assert embed and "per device (49152, 8)" in embed[0]
    assert "compiled step, per device:" in lines[-1] and "on 8 x" in lines[-1]
    assert not out.exists()
    with pytest.raises(SystemExit, match="needs 64 devices, have 1"):
        cli.main([*args, "--mesh", "data=8,fsdp=8", "--dry-run"])
