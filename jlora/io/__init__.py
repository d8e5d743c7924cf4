"""Saving and loading adapters, merged weights and training state (Orbax; no pickle).

Example::

    from jlora import io as jio

    jio.save_adapter("ckpt/adapter", adapted, spec=spec)      # factors only (+ JSON metadata)
    adapted = jio.load_adapter("ckpt/adapter", params)        # re-attach onto plain params
    jio.save_merged("ckpt/merged", adapted)                    # plain Orbax, no jlora needed

    manager = jio.checkpoint_manager("ckpt/train", max_to_keep=3)
    jio.save_state(manager, step, trainable, opt_state, rng)
    step, trainable, opt_state, rng = jio.restore_state(manager, trainable, opt_state, rng)
"""

from jlora.io.peft import PeftFormatError, default_naming, load_peft, read_peft_config, save_peft
from jlora.io.checkpoint import (FORMAT, FORMAT_VERSION, CheckpointError, CorruptCheckpointError, NonFiniteError,
                                 RestoredState, array_digest, check_finite,
                                 checkpoint_manager, load_adapter, read_adapter_metadata,
                                 restore_state, save_adapter, save_merged, save_state)

__all__ = [
    "save_adapter", "load_adapter", "read_adapter_metadata", "save_merged",
    "checkpoint_manager", "save_state", "restore_state", "RestoredState",
    "CheckpointError", "CorruptCheckpointError", "NonFiniteError", "array_digest", "check_finite", "FORMAT", "FORMAT_VERSION",
    "save_peft", "load_peft", "read_peft_config", "default_naming", "PeftFormatError",
]
