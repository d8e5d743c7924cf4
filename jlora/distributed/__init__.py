"""Meshes, sharding rules and many-process runs for adapted parameter trees (LoRA factors inherit
their kernel's partitioning). See :mod:`jlora.distributed.sharding` and
:mod:`jlora.distributed.runtime`."""

from jlora.distributed.rules import DEFAULT_AXIS_MAP, load_rules, resolve_rules
from jlora.distributed.runtime import (ProcessInfo, barrier, global_batch, initialize, is_main_process, process_info,
                                       process_rows, to_host)
from jlora.distributed.sharding import (activation_sharding, batch_shardings, batch_specs, constrain_batch,
                                        make_mesh, normalize_rules, opt_state_shardings, partition_specs, place,
                                        replicated, shard, shardings_for, spec_for_path)

__all__ = [
    "make_mesh", "normalize_rules", "spec_for_path", "partition_specs", "shardings_for",
    "batch_specs", "batch_shardings", "opt_state_shardings", "replicated", "shard", "place",
    "activation_sharding", "constrain_batch",
    "DEFAULT_AXIS_MAP", "resolve_rules", "load_rules",
    "ProcessInfo", "barrier", "initialize", "process_info", "is_main_process", "global_batch", "process_rows", "to_host",
]
