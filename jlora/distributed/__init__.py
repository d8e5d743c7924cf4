"""Meshes and sharding rules for adapted parameter trees (LoRA factors inherit their kernel's
partitioning). See :mod:`jlora.distributed.sharding`."""

from jlora.distributed.sharding import (batch_shardings, batch_specs, make_mesh, normalize_rules,
                                        opt_state_shardings, partition_specs, replicated, shard,
                                        shardings_for, spec_for_path)

__all__ = [
    "make_mesh", "normalize_rules", "spec_for_path", "partition_specs", "shardings_for",
    "batch_specs", "batch_shardings", "opt_state_shardings", "replicated", "shard",
]
