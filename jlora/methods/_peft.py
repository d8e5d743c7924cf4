"""The PEFT codec protocol: how a method's adapters become Hugging Face PEFT tensors and back.

:func:`jlora.io.save_peft` and :func:`jlora.io.load_peft` do the orchestration (module naming,
safetensors, ``modules_to_save``, ``target_modules``, integrity records, atomic writes); what is
method-specific comes from the method's :class:`PeftCodec`, registered here by the jlora method
names it writes (:func:`register_peft_codec`) and chosen for a file by its config
(:meth:`PeftCodec.reads`). Each method module defines and registers its own codec
(``jlora.methods.lora``: LoRA / QLoRA, ``.dora``, ``.ia3``, ``.adalora``).

Also here: the PEFT format facts several codecs share (PEFT's pattern lookup and scaling, the
split of a kernel's axes from flat PyTorch sizes, attaching a read adapter to a leaf).
"""

from __future__ import annotations

import collections
import collections.abc
import dataclasses
import math
import re
from typing import Any, ClassVar, Mapping

import numpy as np

from jlora.core.errors import PeftFormatError
from jlora.core.nodes import AdaptedWeight, AdapterMeta, Layout


@dataclasses.dataclass(frozen=True)
class PeftModule:
    """One PyTorch module of an adapter being saved: rank, scale and dropout of its adapter, the
    jlora leaf path it comes from, its codec, and codec-specific facts (``info``: IA3's
    ``feedforward``, AdaLoRA's kept ``mask``)."""

    path: str
    rank: int
    scale: float
    dropout: float
    codec: Any
    info: Mapping = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class ConfigContext:
    """What a codec's :meth:`PeftCodec.config` needs besides its modules."""

    target_modules: Any          # PEFT target_modules (suffix list or exact regex), computed by io
    modules_to_save: list
    spec: Any                    # the jlora spec passed to save_peft (or None)
    provenance: dict             # base_model_name_or_path, revision
    task_type: Any


@dataclasses.dataclass(frozen=True)
class PeftTarget:
    """One params leaf that PEFT modules of the file map to, handed to :meth:`PeftCodec.build`:
    ``names`` are its module names (one per layer of a stacked kernel), ``parts[module]`` what
    :meth:`PeftCodec.parse` collected for each module."""

    leaf_path: str
    leaf: Any
    shape: tuple
    layout: Layout | None
    stacked: bool
    names: list
    parts: Mapping
    adapter: str
    config: Mapping
    weights_file: str


class PeftCodec:
    """One method's PEFT file form. Subclasses set the class attributes and implement the hooks."""

    #: ``adapter_config.json``'s peft_type this codec writes
    peft_type: ClassVar[str] = ""
    #: the method in messages ("DoRA", "IA3", ...)
    title: ClassVar[str] = ""
    #: the kind in messages about mixing kinds in one file ("lora", "dora", ...)
    kind: ClassVar[str] = ""
    #: what the file calls its per-module weights in messages ("LoRA", "IA3")
    weights_title: ClassVar[str] = "LoRA"
    #: a file of this peft_type holds only this method (a mix with any other kind is refused first)
    solo: ClassVar[bool] = False
    #: a module may also train its bias (PEFT's bias="lora_only")
    trains_bias: ClassVar[bool] = True

    # -- save -----------------------------------------------------------------------------
    def export(self, node: AdaptedWeight, adapter: str, leaf_path: str, stack: tuple, n_in: int, n_out: int,
               embedding: bool):
        """``(tensors, rank, infos)``: ``{key suffix: array}`` (stacked over layers when ``stack``),
        the rank written, and one ``info`` dict per layer (or one for an unstacked kernel)."""
        raise NotImplementedError

    def check_modules(self, modules: Mapping[str, PeftModule]) -> None:
        """Refuses a set of modules one config cannot describe."""

    def config(self, modules: Mapping[str, PeftModule], ctx: ConfigContext) -> dict:
        raise NotImplementedError

    def bias_warning(self, modules: list, saving: bool) -> str | None:
        """A warning for modules (``PeftModule`` on save, module names on load) whose bias PEFT treats
        differently from jlora, or None."""
        return None

    def differs_on_bias(self, meta: AdapterMeta) -> bool:
        """True when this adapter and PEFT's disagree on a module that has a bias."""
        return False

    # -- load -----------------------------------------------------------------------------
    def reads(self, config: Mapping) -> bool:
        """Whether this codec reads a file with this config."""
        raise NotImplementedError

    def check_config(self, config: Mapping, file: str) -> None:
        """Refuses config fields this codec cannot honour."""

    def parse(self, key: str, value, modules: dict, weights_file: str) -> bool:
        """Files ``value`` (the tensor ``key``, prefix removed) under ``modules[module]`` and returns
        True, returns False for a tensor that is not an adapter weight (``modules_to_save``), or
        raises for an adapter tensor this codec does not know."""
        raise NotImplementedError

    def load_warning(self, config: Mapping) -> str | None:
        """A caveat about what loading this file gives (a warning), or None."""
        return None

    def check_parts(self, module: str, parts: Mapping, weights_file: str) -> None:
        """Refuses a module whose collected tensors are incomplete."""

    def build(self, target: PeftTarget) -> AdaptedWeight:
        """The leaf with the adapter read from the file."""
        raise NotImplementedError


_BY_METHOD: dict = {}
_CODECS: list = []


def register_peft_codec(methods, codec: PeftCodec) -> None:
    """Registers ``codec`` as the PEFT form of the jlora ``methods`` (AdapterMeta.method names)."""
    if not isinstance(codec, PeftCodec):
        raise TypeError(f"codec must be a PeftCodec, got {codec!r}")
    for method in ((methods,) if isinstance(methods, str) else methods):
        _BY_METHOD[method] = codec
    if codec not in _CODECS:
        _CODECS.append(codec)


def codec_for_method(method: str):
    """The codec that writes ``method``'s adapters, or None when the method has no PEFT form."""
    return _BY_METHOD.get(method)


def codec_for_config(config: Mapping):
    """The codec that reads a file with this config, or None."""
    for codec in _CODECS:
        if codec.reads(config):
            return codec
    return None


def peft_types() -> tuple:
    """The peft_types the registered codecs read."""
    return tuple(dict.fromkeys(c.peft_type for c in _CODECS))


def method_names() -> tuple:
    return tuple(sorted(_BY_METHOD))


# ------------------------------------------------------------------------------------------
# PEFT format facts shared by codecs

def get_pattern_key(pattern_keys, key_to_match: str) -> str:
    """``peft.utils.other.get_pattern_key``: the first pattern matching the end of the module name
    at a ``.`` boundary, else the module name itself."""
    for key in pattern_keys:
        if re.match(rf"(.*\.)?({key})$", key_to_match):
            return key
    return key_to_match


def pattern_value(pattern: dict, module: str, default):
    """PEFT's ``rank_pattern`` / ``alpha_pattern`` lookup for ``module``."""
    return pattern.get(get_pattern_key(list(pattern), module), default)


def peft_scale(alpha, r, rslora) -> float:
    """PEFT's LoRA scaling: ``alpha / r``, or ``alpha / sqrt(r)`` with ``use_rslora``."""
    return float(alpha) / (math.sqrt(r) if rslora else r)


def nice(value: float, check) -> float | int:
    """``value`` rounded to 12 significant digits (an int when whole) if ``check`` still holds."""
    short = float(f"{value:.12g}")
    if check(short):
        value = short
    return int(value) if float(value).is_integer() and abs(value) < 2 ** 53 else value


def most_common(values):
    counts = collections.Counter(values)
    best = max(counts.values())
    return next(v for v in values if counts[v] == best)  # first seen among the most frequent


def pattern_keys(wanted: dict, default, all_modules):
    """rank_pattern / alpha_pattern keys for the modules whose value differs from ``default``.

    Keys are the full module names, so PEFT's ``(.*\\.)?(key)$`` lookup finds them; if a key
    would also catch another module (``fc`` is a suffix of ``layers.0.fc``), every key is
    anchored instead (``^fc``), which PEFT's lookup matches only at the start of the name."""
    pattern = {m: v for m, v in wanted.items() if v != default}
    if not pattern:
        return {}
    if all(pattern_value(pattern, m, default) == wanted[m] for m in all_modules):
        return pattern
    return {"^" + re.escape(m): v for m, v in pattern.items()}


def suffix(module: str) -> str:
    return module.rsplit(".", 1)[-1]


def split_layout(rest, n_in, n_out, path):
    """The (inputs, outputs) split of the non-stacked axes ``rest`` with the given flat sizes."""
    fits = [k for k in range(1, len(rest)) if math.prod(rest[:k]) == n_in and math.prod(rest[k:]) == n_out]
    if not fits:
        return None
    if len(fits) > 1:
        raise PeftFormatError(f"{path!r} {rest}: cannot tell which axes are inputs ({n_in} features) and outputs "
                              f"({n_out}); pass model=fn, example=args to load_peft")
    return fits[0]


def stack_layers(arrays, stacked: bool):
    """One array per layer -> the stacked array (or the only one)."""
    return np.stack(arrays) if stacked else arrays[0]


def attach(leaf, leaf_path: str, layout: Layout, adapter: str, meta: AdapterMeta, state) -> AdaptedWeight:
    """``leaf`` (a plain kernel or an AdaptedWeight) with the read adapter ``adapter`` added."""
    if isinstance(leaf, AdaptedWeight):
        if adapter in leaf.names:
            raise PeftFormatError(f"{leaf_path!r} already has an adapter named {adapter!r}; pass another adapter=")
        try:
            return leaf.add_adapter(adapter, state, meta)
        except ValueError as e:
            raise PeftFormatError(f"{e} (load onto the plain params)") from None
    node = AdaptedWeight(base=leaf, states={}, layout=layout, adapters=(), active=(), path=leaf_path)
    return node.add_adapter(adapter, state, meta)


# ------------------------------------------------------------------------------------------
# whole-tree forms

#: whole-tree file forms (prompt learning: jlora.methods.prompt_peft): the reserved top-level key of
#: the adapted tree they write -> (the peft_types they read, save(path, adapted, naming, files, **kw),
#: load(path, params, naming, config, files)); ``files`` is io's PEFT file toolkit
#: (jlora.io._peft_files: safetensors, modules_to_save, integrity records, atomic writes)
_TREE_CODECS: dict = {}


def register_tree_codec(key: str, peft_types, save, load) -> None:
    """Registers a PEFT file form that covers a whole tree (its reserved entry ``key``) instead of
    per-kernel modules: :func:`jlora.io.save_peft` hands trees holding ``key`` to ``save`` and
    :func:`jlora.io.load_peft` hands files of ``peft_types`` to ``load``, each with io's file toolkit."""
    _TREE_CODECS[key] = (tuple(t.upper() for t in peft_types), save, load)


def tree_codec_for_tree(tree):
    """``(save, load)`` of the whole-tree form whose reserved entry ``tree`` holds, or None."""
    if not isinstance(tree, collections.abc.Mapping):
        return None
    return next(((save, load) for key, (_, save, load) in _TREE_CODECS.items() if key in tree), None)


def tree_codec_for_type(peft_type):
    """``(save, load)`` of the whole-tree form that reads ``peft_type``, or None."""
    return next(((save, load) for types, save, load in _TREE_CODECS.values() if str(peft_type).upper() in types), None)


def tree_peft_types() -> tuple:
    return tuple(t for types, _, _ in _TREE_CODECS.values() for t in types)
