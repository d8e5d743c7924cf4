"""jlora: parameter-efficient fine-tuning for JAX/Flax as pure transforms over parameter pytrees."""

import importlib

from jlora._version import __version__

from jlora.core.api import (activate, adapter_names, apply, combine, combine_adapters, count,
                            delete_adapter, mark_trainable, merge, merge_error, partition, summary,
                            unmerge)
from jlora.core.errors import CheckpointError, Error, FactoringError
from jlora.core.lift import lift
from jlora.core.nodes import AdaptedWeight, AdapterMeta, Layout, LoRANode, Trainable, is_node
from jlora.core.spec import Axes
from jlora.methods.lora import LoRA
from jlora.methods.qlora import QLoRA
from jlora.methods.dora import DoRA, QDoRA
from jlora.methods.ia3 import IA3
from jlora.methods.adalora import AdaLoRA, adalora_allocator
from jlora.methods.prompt import (PrefixTuning, PromptTuning, PTuning, apply_prompt, export_prompt,
                                  prompt_kwargs)
from jlora.methods.tcur import TCURLoRA


__all__ = [
    "LoRA", "QLoRA", "DoRA", "QDoRA", "IA3", "Axes", "Layout", "AdaptedWeight", "LoRANode", "Trainable", "AdapterMeta", "is_node",
    "apply", "partition", "combine", "merge", "unmerge", "summary", "count", "lift",
    "activate", "adapter_names", "mark_trainable", "merge_error", "delete_adapter", "combine_adapters",
    "AdaLoRA", "adalora_allocator",
    "PromptTuning", "PrefixTuning", "PTuning", "apply_prompt", "prompt_kwargs", "export_prompt", "load_prompt_adapter",
    "TCURLoRA",
    "Error", "FactoringError", "CheckpointError", "estimate",
]


def __getattr__(name):  # lazy submodules: `jlora.train`, `jlora.io`, `jlora.distributed`, `jlora.planner`
    if name == "load_prompt_adapter":   # the pre-0.2 name: jlora.io.load_adapter restores a saved prompt itself
        return importlib.import_module("jlora.io").load_adapter
    if name == "estimate":   # the memory planner (jlora.planner.estimate; it needs jlora's models)
        return importlib.import_module("jlora.planner").estimate
    if name in ("train", "io", "distributed", "data", "models", "assets", "quant", "cli", "planner"):
        return importlib.import_module(f"jlora.{name}")
    raise AttributeError(f"module 'jlora' has no attribute {name!r}")
