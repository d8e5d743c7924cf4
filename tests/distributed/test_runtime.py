"""One-process checks of the many-process helpers (the many-process runs are in test_pod.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jlora.data import batches
from jlora.distributed import (constrain_batch, global_batch, initialize, make_mesh, place, process_info,
                               process_rows, replicated, to_host)
from jlora.io.checkpoint import checkpoint_directory


def test_initialize_checks_its_arguments_before_joining_anything(monkeypatch):
    for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(ValueError, match="'10.0.0.2' is not host:port"):
        initialize("10.0.0.2", 2, 0)
    with pytest.raises(ValueError, match="process_id 2 is out of range for 2 processes"):
        initialize("127.0.0.1:1234", 2, 2)
    with pytest.raises(ValueError, match="give both the number of processes and this process's id"):
        initialize("127.0.0.1:1234", 2)
    monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES='two' is not an integer"):
        initialize()
    monkeypatch.setenv("JAX_NUM_PROCESSES", "1")
    monkeypatch.setenv("JAX_PROCESS_ID", "0")
    info = initialize()   # one process asked for: nothing to join
    assert (info.index, info.count, info.is_main) == (0, 1, True) and info == process_info()


def test_process_rows_and_per_process_batches():
    assert process_rows(8, process_index=1, process_count=2) == slice(4, 8)
    with pytest.raises(ValueError, match="12 rows cannot be split evenly over 8 processes"):
        process_rows(12, process_index=0, process_count=8)
    with pytest.raises(ValueError, match="process_index 2 is out of range"):
        process_rows(8, process_index=2, process_count=2)
    arrays = {"x": np.arange(40).reshape(20, 2), "y": np.arange(20)}
    whole = list(batches(arrays, 8, seed=3, epochs=2))
    parts = [list(batches(arrays, 8, seed=3, epochs=2, process_index=i, process_count=2)) for i in range(2)]
    assert len(whole) == len(parts[0]) == len(parts[1]) == 4
    for w, a, b in zip(whole, *parts):   # disjoint halves that together are the one-process batch
        np.testing.assert_array_equal(np.concatenate([a["y"], b["y"]]), w["y"])
        assert not set(a["y"]) & set(b["y"]) and a["x"].shape == (4, 2)
    resumed = list(batches(arrays, 8, seed=3, epochs=2, start=3, process_index=1, process_count=2))
    np.testing.assert_array_equal(resumed[0]["y"], parts[1][3]["y"])


def test_one_process_global_batch_place_and_hooks():
    mesh = make_mesh((-1,), ("data",))
    n = len(jax.devices())
    batch = global_batch({"ids": np.arange(2 * n)}, mesh, ("data",))
    assert batch["ids"].shape == (2 * n,) and batch["ids"].sharding.spec == jax.sharding.PartitionSpec("data")
    with pytest.raises(ValueError, match=r"not divisible by the \d+ devices") if n > 1 else _nothing():
        global_batch({"ids": np.arange(2 * n + 1)}, mesh, ("data",))
    key = place(jax.random.key(3), replicated(mesh))
    assert jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) and key.sharding == replicated(mesh)
    x = jnp.ones((4, 3))
    assert constrain_batch(x) is x   # outside a sharded step: untouched
    np.testing.assert_array_equal(to_host({"a": x})["a"], np.ones((4, 3)))


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def test_remote_checkpoint_directories_reach_orbax_untouched(tmp_path, monkeypatch):
    assert checkpoint_directory("gs://bucket/run") == "gs://bucket/run"
    assert checkpoint_directory("s3://b/x/y") == "s3://b/x/y"
    monkeypatch.chdir(tmp_path)
    assert checkpoint_directory("runs/a") == str(tmp_path / "runs" / "a")
    with pytest.raises(ValueError, match="non-empty path"):
        checkpoint_directory("")


def test_quantized_base_fields_follow_the_kernel_split():
    """NF4 fields are flat (stack + (n,)): they take every mesh axis of the kernel's matrix axes,
    and fewer where a field's length does not divide."""
    import jlora
    from jax.sharding import AbstractMesh, PartitionSpec as P
    from jlora.distributed.sharding import _fit_quantized, _quantized_specs

    params = {"w": {"kernel": jnp.ones((3, 64, 32))}}   # a stacked (layers, in, out) kernel
    adapted = jlora.apply(params, jlora.QLoRA(rank=2, targets=r"w/kernel", block=64, double_quant=True,
                                              axes={"w/kernel": jlora.Axes(stack=1, inputs=1)}),
                          key=jax.random.key(0))
    q = adapted["w"]["kernel"].base
    specs = _quantized_specs(q, P(None, "fsdp", "tensor"), stack=1)
    assert specs.data == P(None, ("fsdp", "tensor")) and specs.offset == P(None)
    mesh = AbstractMesh((4, 2), ("fsdp", "tensor"))
    assert _fit_quantized(specs.data, q.data.shape, mesh, 1) == P(None, ("fsdp", "tensor"))   # 1024 bytes / 8
    # 32 blocks of 64 -> qscale (3, 32) splits 8 ways; scale2 (3, 1) cannot split at all
    assert _fit_quantized(specs.qscale, q.qscale.shape, mesh, 1) == P(None, ("fsdp", "tensor"))
    assert _fit_quantized(specs.scale2, q.scale2.shape, mesh, 1) == P(None, None)
    assert _fit_quantized(P(None, ("fsdp", "tensor")), (3, 12), mesh, 1) == P(None, "fsdp")   # 12 % 8, 12 % 4 == 0
