"""A pod run on this machine: 2 processes x 4 CPU devices (``jax.distributed`` on 127.0.0.1, gloo
collectives) against 1 process x 8 devices, jlora's Llama (scan_layers, remat) on mesh
(data=2, fsdp=4) with the model's default partition rules. The script they run is
``_pod_worker.py``; every process is bounded by a timeout."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import orbax.checkpoint as ocp
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
WORKER = ROOT / "tests" / "distributed" / "_pod_worker.py"
TIMEOUT = 420


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_") and k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), **extra)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(mode, out, n_procs, *methods):
    """Starts the run (n_procs processes); returns the Popen objects."""
    args = [sys.executable, str(WORKER), mode, str(out), *methods]
    if n_procs == 1:
        return [subprocess.Popen(args, env=_env(POD_LOCAL_DEVICES="8"), stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)]
    port = _free_port()
    return [subprocess.Popen(args, env=_env(POD_LOCAL_DEVICES=str(8 // n_procs), JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                                            JAX_NUM_PROCESSES=str(n_procs), JAX_PROCESS_ID=str(i)),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(n_procs)]


def _start_launcher(mode, out, *methods):
    """The same 2-process run through the pod launcher's local mode (``tpu_scripts/jlora-tpu local 2``),
    the entry point a slice runs, with the coordinator on 127.0.0.1."""
    cmd = [str(ROOT / "tpu_scripts" / "jlora-tpu"), "local", "2", "--devices-per-process", "4", "--logs",
           str(out / f"logs-{mode}"), "--timeout", str(TIMEOUT - 20), "--", sys.executable, str(WORKER), mode, str(out),
           *methods]
    return [subprocess.Popen(cmd, env=_env(POD_LOCAL_DEVICES="4"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)]


def _finish(procs, expect_rc=0):
    outs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=TIMEOUT)
            outs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, out in zip(procs, outs):
        assert p.returncode == expect_rc, f"rc {p.returncode}:\n{out[-4000:]}"
    return outs


def _npz(path):
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def _close(a, b, atol=1e-5):
    params = [k for k in a if not k.startswith("__")]
    assert sorted(params) == sorted(k for k in b if not k.startswith("__"))
    return max(float(np.max(np.abs(a[k] - b[k]))) for k in params)


def _tree_files(d: pathlib.Path) -> dict:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Both layouts train every method; the 2-process run then saves a training state after steps 1
    and 2 and is SIGKILLed while saving step 3; both layouts resume from that directory."""
    out = tmp_path_factory.mktemp("pod")
    single = _start("train", out, 1)
    launched = _finish(_start_launcher("train", out))
    assert "DONE 0" in launched[0] and "DONE 1" in (out / "logs-train" / "worker-1.log").read_text()
    killed = _finish(_start("kill", out, 2), expect_rc=-9)
    _finish(single)
    resumed = [_start("resume", out, 2), _start("resume", out, 1)]
    for r in resumed:
        _finish(r)
    return out, killed


@pytest.mark.parametrize("method", ["lora", "qlora", "dora"])
def test_two_processes_train_like_one(runs, method):
    out, _ = runs
    one, two = _npz(out / f"{method}-p1.npz"), _npz(out / f"{method}-p2.npz")
    np.testing.assert_allclose(two["__losses"], one["__losses"], rtol=1e-5)
    assert _close(one, two) < 1e-5
    assert len(one["__losses"]) == 4 and len(set(np.round(one["__losses"], 6))) > 1   # steps did something
    meta = json.loads((out / f"{method}-p2.json").read_text())
    assert meta["process_count"] == 2 and meta["devices"] == 8
    # the model's rules split the kernel's input (embed) axis over fsdp; the factor A follows it
    assert meta["q_a_shape"] == [2, 64, 4] and meta["q_a_shard_shape"] == [2, 16, 4]
    if method == "qlora":   # NF4 codes split along the flattened kernel's fsdp axis, stack axis whole
        assert meta["q_base_sharding"] == [None, "fsdp"]
    else:
        assert meta["q_base_sharding"] == [None, "fsdp", None]


def test_killed_run_resumes_on_either_layout(runs):
    out, killed = runs
    assert any("KILLED 0" in o for o in killed)
    steps = sorted(p.name for p in (out / "ckpt").iterdir())
    # the step being written when the processes died never became a checkpoint
    assert "1" in steps and "2" in steps and "3" not in steps
    reference = _npz(out / "lora-p1.npz")
    for tag in ("p1", "p2"):
        resumed = _npz(out / f"resumed-{tag}.npz")
        assert int(resumed["__step"]) == 2
        np.testing.assert_allclose(resumed["__losses"], reference["__losses"][2:], rtol=1e-5)
        assert _close(resumed, reference) < 1e-5


def test_exports_from_two_processes_equal_one(runs):
    out, _ = runs
    # PEFT: the same bytes
    assert _tree_files(out / "peft-p1") == _tree_files(out / "peft-p2")
    # jlora adapter: the same description, the sha256 of every array included (the values are equal)
    m1 = json.loads((out / "adapter-p1" / "jlora_adapter.json").read_text())
    m2 = json.loads((out / "adapter-p2" / "jlora_adapter.json").read_text())
    assert m1 == m2 and len(m1["sha256"]) == 14   # 7 projections x (A, B)
    # merged weights: plain Orbax, identical values
    merged = [ocp.StandardCheckpointer().restore(out / f"merged-{t}") for t in ("p1", "p2")]
    flat = [dict(_flatten(m)) for m in merged]
    assert flat[0].keys() == flat[1].keys() and len(flat[0]) > 10
    for k in flat[0]:
        np.testing.assert_array_equal(np.asarray(flat[0][k]), np.asarray(flat[1][k]))
    # nothing half-written next to the exports
    assert not [p.name for p in out.iterdir() if "jlora-tmp" in p.name]
    # the adapter loads onto a sharded base with its factors split like the kernel
    for tag in ("p1", "p2"):
        loaded = json.loads((out / f"loaded-{tag}.json").read_text())
        assert loaded["a_spec"] == [None, "fsdp", None] and loaded["a_shard_shape"] == [2, 16, 4]


def _flatten(tree, prefix=""):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _flatten(v, f"{prefix}/{k}")
    else:
        yield prefix, tree


def test_fsdp_activation_memory_falls_with_devices(tmp_path):
    """Compiled temp bytes per device of the LoRA step (global batch 16 x 64 tokens): splitting the
    batch over 8 devices, on data, data x fsdp or fsdp alone, cuts activations to about 1/8."""
    _finish(_start("memory", tmp_path, 1))
    mem = json.loads((tmp_path / "memory.json").read_text())
    one = mem["1"]["temp"]
    for shape in ("8", "2x4", "1x8"):
        assert mem[shape]["temp"] < one / 4, (shape, mem)
    # fsdp alone is not worse than data parallelism by more than the gathered weights
    assert mem["1x8"]["temp"] < 2 * mem["8"]["temp"], mem
