"""Many processes, one program: starting ``jax.distributed``, global batches from each process's
own rows, and which process speaks.

On a TPU VM slice every worker runs the same command; :func:`initialize` then needs no
arguments (JAX reads the slice's metadata). On CPU or GPU machines give it a coordinator, or set
the environment variables a launcher sets (``tpu_scripts/jlora-tpu local N`` does)::

    JAX_COORDINATOR_ADDRESS=10.0.0.2:8476   # host:port of process 0 (the port must be free on it)
    JAX_NUM_PROCESSES=4                     # how many processes in all
    JAX_PROCESS_ID=1                        # this process, 0 .. JAX_NUM_PROCESSES - 1

A training script then builds a mesh over *all* devices, gives every process its own rows
(:func:`jlora.data.batches` does that by default once JAX is distributed) and turns them into one
global batch::

    info = jlora.distributed.initialize()
    mesh = jlora.distributed.make_mesh((2, -1), ("data", "fsdp"))
    for local in jlora.data.batches(arrays, global_batch_size, seed=0, epochs=None):
        batch = jlora.distributed.global_batch(local, mesh, ("data", "fsdp"))
        trainable, opt_state, metrics = step(trainable, frozen, opt_state, batch, key)

(:func:`jlora.train.make_step` also accepts each process's numpy rows directly and does this
itself.)
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jlora.distributed.sharding import _batch_axes, batch_entry

__all__ = ["ProcessInfo", "initialize", "process_info", "is_main_process", "barrier", "global_batch",
           "process_rows", "to_host"]

_ENV_ADDRESS = "JAX_COORDINATOR_ADDRESS"
_ENV_COUNT = "JAX_NUM_PROCESSES"
_ENV_ID = "JAX_PROCESS_ID"


@dataclasses.dataclass(frozen=True)
class ProcessInfo:
    """Where this process stands: ``index`` of ``count`` processes, its ``local_devices`` out of
    ``devices`` in all."""

    index: int
    count: int
    local_devices: int
    devices: int

    @property
    def is_main(self) -> bool:
        return self.index == 0


def process_info() -> ProcessInfo:
    """This process's :class:`ProcessInfo` (one process of one when JAX is not distributed)."""
    return ProcessInfo(jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())


def is_main_process() -> bool:
    """True on the process that logs, prints progress and writes single files (process 0)."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Waits until every process has reached the barrier ``name`` (nothing with one process). Use
    it between a decision every process makes from shared files and process 0's writing them."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def _env_int(name: str):
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None


def _check_address(address: str) -> str:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"coordinator address {address!r} is not host:port (e.g. 10.0.0.2:8476)")
    return address


def _already() -> bool:
    return bool(jax.distributed.is_initialized())


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, local_device_ids: Sequence[int] | None = None,
               timeout_s: int = 300, cpu_collectives: str | None = "gloo") -> ProcessInfo:
    """Starts ``jax.distributed`` for a run of many processes and returns this process's
    :class:`ProcessInfo`. Call it once, first, before anything touches a device.

    Arguments left ``None`` come from ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` /
    ``JAX_PROCESS_ID``; where those are unset too, JAX detects the cluster itself (Cloud TPU VMs,
    SLURM, Open MPI, Kubernetes). ``cpu_collectives`` picks the CPU backend's cross-process
    collectives (``"gloo"``; ``None`` leaves JAX's setting), which only CPU devices use, so a
    pod's TPU program is unaffected. Calling it again in an initialised process is a no-op.

    Example (two processes on one machine; run each with its own id)::

        info = jlora.distributed.initialize("127.0.0.1:8476", num_processes=2, process_id=0)
        info.index, info.count, info.devices      # (0, 2, 8) with 4 CPU devices per process
    """
    if _already():
        return process_info()
    address = coordinator_address if coordinator_address is not None else os.environ.get(_ENV_ADDRESS) or None
    count = num_processes if num_processes is not None else _env_int(_ENV_COUNT)
    pid = process_id if process_id is not None else _env_int(_ENV_ID)
    if address is not None:
        _check_address(address)
    for name, v in (("num_processes", count), ("process_id", pid)):
        if v is not None and (not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 0):
            raise ValueError(f"{name} must be a non-negative int, got {v!r}")
    if count is not None and count < 1:
        raise ValueError(f"num_processes must be at least 1, got {count}")
    if count is not None and pid is not None and pid >= count:
        raise ValueError(f"process_id {pid} is out of range for {count} processes (0 .. {count - 1})")
    if (count is None) != (pid is None) and address is not None:
        raise ValueError(f"give both the number of processes and this process's id ({_ENV_COUNT} / {_ENV_ID}), "
                         f"got num_processes={count!r}, process_id={pid!r}")
    if count == 1 and pid == 0 and address is None:
        return process_info()   # one process asked for: nothing to join
    if cpu_collectives is not None:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    kwargs = dict(coordinator_address=address, num_processes=count, process_id=pid,
                  initialization_timeout=int(timeout_s))
    if local_device_ids is not None:
        kwargs["local_device_ids"] = list(local_device_ids)
    try:
        jax.distributed.initialize(**kwargs)
    except (ValueError, RuntimeError) as e:
        if address is None and count is None:
            raise RuntimeError(
                f"jlora.distributed.initialize: JAX found no cluster to join ({str(e).splitlines()[0]}); on "
                f"CPU/GPU machines pass coordinator_address, num_processes and process_id, or set "
                f"{_ENV_ADDRESS}, {_ENV_COUNT} and {_ENV_ID}") from e
        raise
    return process_info()


# ------------------------------------------------------------------------------------------
# data

def process_rows(global_rows: int, *, process_index: int | None = None, process_count: int | None = None) -> slice:
    """The rows of a global batch of ``global_rows`` that this process supplies: contiguous,
    disjoint, in process order (``process_index * n : (process_index + 1) * n``). This matches how
    :func:`global_batch` lays the rows out on a mesh whose batch axes follow the process order
    (:func:`make_mesh` over ``jax.devices()``)."""
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if not 0 <= index < count:
        raise ValueError(f"process_index {index} is out of range for {count} processes")
    if global_rows % count:
        raise ValueError(f"a global batch of {global_rows} rows cannot be split evenly over {count} processes; "
                         f"use a batch size divisible by {count}")
    n = global_rows // count
    return slice(index * n, (index + 1) * n)


def global_batch(local_batch, mesh: Mesh, batch_axes=("data",)):
    """One global ``jax.Array`` batch from each process's own rows: every leaf's leading dim is
    this process's share (``global / process_count`` rows), split over the mesh's ``batch_axes``
    and concatenated in process order (``jax.make_array_from_process_local_data``). On one process
    it places the batch like :func:`batch_shardings` does. Leaves that are already global
    ``jax.Array`` s on ``mesh`` pass through.

    Example::

        batch = global_batch({"input_ids": rows_of_this_process}, mesh, ("data", "fsdp"))
    """
    axes = _batch_axes(mesh, batch_axes)
    size = math.prod(mesh.shape[a] for a in axes)
    count = jax.process_count()

    def one(path, x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return x
        x = np.asarray(jax.device_get(x))
        where = jax.tree_util.keystr(path) or "<root>"
        if x.ndim == 0:
            if count > 1:
                raise ValueError(f"batch leaf {where} is a scalar; a batch built from each process's rows needs a "
                                 f"leading (rows) axis on every leaf")
            return jax.device_put(x, NamedSharding(mesh, P()))
        spec = P(batch_entry(axes))
        rows = x.shape[0] * count
        if axes and rows % size:
            raise ValueError(f"batch leaf {where}: {x.shape[0]} rows on each of {count} process(es) make a global "
                             f"batch of {rows}, which is not divisible by the {size} devices of batch axes {axes}")
        return jax.make_array_from_process_local_data(NamedSharding(mesh, spec), x, (rows,) + x.shape[1:])

    return jax.tree_util.tree_map_with_path(one, local_batch)


def to_host(tree):
    """Numpy copies of a tree of (possibly multi-process) arrays, the same on every process:
    each array is gathered in full (``multihost_utils.process_allgather``); use it for small
    things (metrics, adapter factors), never for a full model's weights on a large pod."""
    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x)) if isinstance(x, jax.Array) else x

    return jax.tree_util.tree_map(one, tree)
