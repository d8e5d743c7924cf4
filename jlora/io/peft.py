"""Hugging Face PEFT adapter files (LoRA, DoRA, IA3): export jlora adapters, import PEFT-trained ones.
(Prompt tuning / prefix tuning / P-tuning files: :mod:`jlora.methods.prompt_peft`, which :func:`save_peft`
and :func:`load_peft` hand over to when the tree carries a prompt or the file is a prompt-learning one.)

A PEFT adapter is a directory with two files, which :func:`save_peft` writes and
:func:`load_peft` reads:

* ``adapter_config.json``: the ``LoraConfig`` (``peft_type: "LORA"``, ``r``, ``lora_alpha``,
  ``use_rslora``, ``rank_pattern``, ``alpha_pattern``, ``target_modules``, ``modules_to_save``, ...);
* ``adapter_model.safetensors``: tensors keyed by PyTorch module names::

      base_model.model.<module>.lora_A.weight          (r, in_features)
      base_model.model.<module>.lora_B.weight          (out_features, r)
      base_model.model.<module>.lora_embedding_A       (r, num_embeddings)     nn.Embedding targets
      base_model.model.<module>.lora_embedding_B       (embedding_dim, r)
      base_model.model.<module>.lora_magnitude_vector  (out_features,)        DoRA (use_dora=true)
      base_model.model.<module>.ia3_l                  (out_features, 1)      IA3 (peft_type "IA3")
                                                       (1, in_features)       IA3 feedforward_modules
      base_model.model.<module>.weight / .bias         modules_to_save (PyTorch layout)

jlora keeps factors in Flax's (in, out) order: ``a: stack + inputs + (r,)``, ``b: stack + (r,) +
outputs``, so ``lora_A.weight = a.reshape(in, r).T`` and ``lora_B.weight = b.reshape(r, out).T``
(several input / output axes, e.g. a DenseGeneral ``(d_model, heads, head_dim)`` kernel, are
flattened row-major, as a PyTorch ``nn.Linear(d_model, heads * head_dim)`` stores them).
PEFT's scaling is ``lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``); jlora's
``AdapterMeta.scale`` is that number.

DoRA adapters (method "dora") are LoRA files with ``use_dora: true`` and a magnitude per module
(jlora's ``extra["m"]``, flattened over the output axes; ``cache["w0_sq"]`` is recomputed from the
base on load). ``use_dora`` is global in PEFT, so one file cannot mix DoRA and plain LoRA modules.
QLoRA adapters are written as plain LoRA (PEFT files do not hold the quantised base). IA3 adapters
(method "ia3") become an ``IA3Config`` file (``target_modules``, ``feedforward_modules``) with
``ia3_l`` = jlora's ``extra["l"]``. PEFT's IA3 also scales the bias of a non-feed-forward layer,
jlora's does not: both functions warn when such a layer has a bias.

AdaLoRA adapters (method "adalora") are written and read as ``AdaLoraConfig`` files: per module
``lora_A`` (k, in), ``lora_E`` (k, 1), ``lora_B`` (out, k) for the k triplets whose singular value is
non-zero, ``rank_pattern`` ``{"<module>.lora_E": kept mask over init_r}`` so that PEFT resizes the
module on load, and ``lora_alpha = scale * (init_r + 1e-5)`` (PEFT divides by ``ranknum = init_r``).
Pass the ``jlora.AdaLoRA`` spec to record its schedule (``init_r``, ``target_r``, ``total_step`` ...).
:func:`load_peft` builds AdaLoRA nodes (``lora_E`` as ``extra["e"]``, scale ``lora_alpha / (init_r +
1e-5)``), checking each module's triplet count against ``rank_pattern``.

Module names come from a ``naming(path, layer)`` function mapping a jlora leaf path (e.g.
``'params/encoder/layer_0/attention/self/query/kernel'``) to the PyTorch module name without the
``base_model.model.`` prefix (``'bert.encoder.layer.0.attention.self.query'``). For a kernel with a
stacked-layers axis (a scanned ``(L, in, out)`` kernel, ``layout.stack == 1``) it is called once per
layer with ``layer=0..L-1``; each layer is written as its own module, and :func:`load_peft`
gathers the L modules and stacks them again. :func:`default_naming` covers simple Flax models.

Not covered: ``lora_bias``, ``layer_replication``, trainable tokens, ``target_parameters``
(errors), DoRA on embeddings, other PEFT methods (LoHa, LoKr ...), convolution
kernels in PyTorch's (out, in, kh, kw) order (a Flax ``Conv`` kernel would be exported as a
flattened Linear), PiSSA / OLoRA nodes on save (their base is a residual that PEFT files cannot
describe), and stacked ``modules_to_save`` leaves.

Example::

    naming = lambda path, layer: jlora.io.peft.default_naming(path, layer)
    jlora.io.save_peft("out/peft", adapted, naming, base_model_name_or_path="bert-base-uncased")
    torch_model = peft.PeftModel.from_pretrained(hf_model, "out/peft")   # in PyTorch

    adapted = jlora.io.load_peft("hub/adapter", params, naming)          # and back
"""

from __future__ import annotations

import collections
import collections.abc
import difflib
import json
import math
import os
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from jlora.core import axes as axes_mod
from jlora.core.errors import PeftFormatError
from jlora.core.nodes import AdaptedWeight, Layout, Trainable, is_adapter_leaf
from jlora.core.paths import flatten_with_paths
from jlora.core.state import rewrites_base
from jlora.distributed.runtime import to_host
from jlora.methods import _peft as peft_format
from jlora.io._peft_files import (  # noqa: F401 (CONFIG_NAME ... and the safetensors helpers are used from here)
    CONFIG_NAME, Naming, PREFIX, WEIGHTS_NAME, _call_naming, _is_embedding, _modules_to_save_tensors, _place_modules_to_save, _provenance, _read_safetensors, _target_match, _try_naming, _verify_integrity, _write_adapter_dir, _write_safetensors, default_naming)
from jlora.methods import adalora as _adalora, dora as _dora, ia3 as _ia3, lora as _lora  # noqa: F401 (their codecs)
from jlora.io import _peft_files
from jlora.methods import prompt_peft as _prompt_peft  # noqa: F401 (registers the prompt-learning file form)
from jlora.methods._peft import tree_codec_for_tree, tree_codec_for_type, tree_peft_types


__all__ = ["save_peft", "load_peft", "read_peft_config", "default_naming", "PeftFormatError",
           "CONFIG_NAME", "WEIGHTS_NAME"]


# ------------------------------------------------------------------------------------------
# naming


# ------------------------------------------------------------------------------------------
# safetensors (own reader/writer: numpy has no bfloat16, safetensors.numpy cannot write it)


# ------------------------------------------------------------------------------------------
# PEFT config helpers


# ------------------------------------------------------------------------------------------
# jlora leaf <-> PyTorch parameter (modules_to_save)


# ------------------------------------------------------------------------------------------
# save


def save_peft(path, adapted, naming: Naming, *, adapter: str = "default", base_model_name_or_path: str | None = None,
              revision: str | None = None, task_type: str | None = None, overwrite: bool = False, spec=None) -> str:
    """Writes adapter ``adapter`` of ``adapted`` as a PEFT LoRA / DoRA / IA3 adapter directory at ``path``
    (``adapter_config.json`` + ``adapter_model.safetensors``), loadable with
    ``peft.PeftModel.from_pretrained(torch_model, path)``. Returns the absolute path.

    Every :class:`AdaptedWeight` carrying ``adapter`` becomes ``lora_A`` / ``lora_B`` of the module
    ``naming(path, None)`` (or, for a stacked ``(L, ...)`` kernel, of the L modules
    ``naming(path, i)``); factors keep their dtype. ``Trainable`` leaves (``train_also``) become
    ``modules_to_save``: their module's every parameter (Trainable or not) is written in PyTorch
    layout (2-D kernels transposed to (out, in), ``scale`` / ``embedding`` as ``weight``).
    ``r`` is the most common rank and ``lora_alpha`` is chosen so that PEFT's scaling equals each
    node's scale (``rank_pattern`` / ``alpha_pattern`` for the modules that differ). Pass the
    ``jlora.LoRA`` ``spec`` to write ``use_rslora`` (then alpha = scale * sqrt(r)); without it
    ``use_rslora`` is false and alpha = scale * r (the same scaling either way).

    DoRA adapters also write ``lora_magnitude_vector`` (and ``use_dora: true``); IA3 adapters write
    an IA3 file (``ia3_l``, ``feedforward_modules``). Mixing DoRA with plain LoRA modules, or IA3
    with either, in one adapter raises ``ValueError`` (a PEFT file holds one kind).

    ``base_model_name_or_path`` (a Hub repo id, or a local directory as a ``str``) and
    ``revision`` (the base model's branch, tag or commit) are written to ``adapter_config.json``
    under PEFT's field names; ``peft.AutoPeftModel*.from_pretrained(path)`` loads the base model
    from them (``from_pretrained(base_model_name_or_path, revision=revision)``). Left at None they
    are written as ``null`` and the base model must be given by hand
    (``peft.PeftModel.from_pretrained(base, path)``). A value that is not None must be a non-empty
    ``str``, else ``ValueError``.

    The write is atomic; an existing ``path`` is only replaced with ``overwrite=True``.

    Example::

        naming = functools.partial(jlora.models.bert.hf_module_name, prefix="")   # a bare BertModel
        jlora.io.save_peft("out/peft", adapted, naming, task_type="FEATURE_EXTRACTION",
                           base_model_name_or_path=str(base_dir))     # the local directory params came from
        model = peft.AutoPeftModelForFeatureExtraction.from_pretrained("out/peft")   # base read from base_dir
    """
    provenance = _provenance(base_model_name_or_path, revision)
    if not callable(naming):
        raise TypeError(f"naming must be a function (path, layer) -> module name, got {naming!r}")
    if jax.process_count() > 1:   # arrays spread over processes: every process gathers, process 0 writes
        adapted = to_host(adapted)
    whole_tree = tree_codec_for_tree(adapted)   # prompt / prefix / P-tuning: one form for the whole tree
    if whole_tree is not None:
        return whole_tree[0](path, adapted, naming, _peft_files, base_model_name_or_path=base_model_name_or_path,
                             revision=revision, task_type=task_type, overwrite=overwrite)
    flat, _ = flatten_with_paths(adapted, is_leaf=is_adapter_leaf)
    tensors: dict[str, np.ndarray] = {}
    modules: dict[str, peft_format.PeftModule] = {}
    others_with_adapter = []

    def claim(module, where):
        if module in modules or any(k.startswith(f"{PREFIX}{module}.") for k in tensors):
            raise ValueError(f"naming maps {where} to the module {module!r}, which another leaf already uses")

    for leaf_path, leaf in flat:
        if isinstance(leaf, AdaptedWeight):
            if adapter not in leaf.names:
                if leaf.adapters:
                    others_with_adapter.append(leaf_path)
                continue
            meta = leaf.meta[adapter]
            codec = _export_codec(leaf, leaf_path, adapter, meta)
            layout = leaf.layout
            stack, inputs, outputs = layout.split(leaf.shape)
            per_layer, rank, infos = codec.export(leaf, adapter, leaf_path, stack, math.prod(inputs),
                                                  math.prod(outputs), _is_embedding(leaf_path))
            for layer in ([None] if not stack else range(stack[0])):
                module = _call_naming(naming, leaf_path, layer)
                claim(module, f"{leaf_path!r}" + ("" if layer is None else f" layer {layer}"))
                for suffix, arrays in per_layer.items():
                    key = f"{PREFIX}{module}.{suffix}"
                    tensors[key] = np.ascontiguousarray(arrays if layer is None else arrays[layer])
                modules[module] = peft_format.PeftModule(leaf_path, rank, float(meta.scale), float(meta.dropout),
                                                         codec, infos[0 if layer is None else layer])
        elif isinstance(leaf, Trainable):
            continue
        elif is_adapter_leaf(leaf):
            raise ValueError(f"save_peft cannot export {type(leaf).__name__} at {leaf_path!r} (only adapted weights)")

    codec = _one_codec(modules, adapter)
    lora_biases: list[str] = []
    save_modules = _modules_to_save_tensors(flat, naming, tensors, PREFIX, adapted_modules=modules,
                                            lora_biases=lora_biases)
    if not modules:
        hint = f" (nodes carry other adapters: {others_with_adapter[:4]})" if others_with_adapter else ""
        extra = (" PEFT cannot load an adapter that only has modules_to_save (the Trainable leaves)"
                 if save_modules else " Did you pass the plain params?")
        raise ValueError(f"save_peft: no LoRA node carries an adapter named {adapter!r}{hint}.{extra}")
    codec.check_modules(modules)
    leaves = dict(flat)
    with_bias = list(dict.fromkeys(   # leaf paths (one per stacked kernel, not per layer)
        info.path for info in modules.values()
        if codec.differs_on_bias(leaves[info.path].meta[adapter]) and f"{info.path.rsplit('/', 1)[0]}/bias" in leaves))
    if with_bias:
        warnings.warn(codec.bias_warning(with_bias, saving=True), stacklevel=2)
    to_save = sorted(set(save_modules))
    ctx = peft_format.ConfigContext(target_modules=_target_modules(list(modules), to_save, flat, naming),
                                    modules_to_save=to_save, spec=spec, provenance=provenance, task_type=task_type)
    config = codec.config(modules, ctx)
    if lora_biases:
        if not codec.trains_bias:
            raise ValueError(f"save_peft: {codec.title} files hold no trained biases; {lora_biases[:3]} train theirs")
        config["bias"] = "lora_only"
    return _write_adapter_dir(path, overwrite, tensors, config)


def _export_codec(leaf, leaf_path, adapter, meta):
    """The codec that writes ``adapter`` of ``leaf``, after the checks every method shares."""
    if leaf_path.rsplit("/", 1)[-1] in ("bias", "scale"):
        raise ValueError(f"{leaf_path!r} carries a LoRA adapter, but PEFT adapts only module weights (kernels, "
                         f"embeddings); narrow the spec's targets (e.g. r'.*/fc/kernel')")
    codec = peft_format.codec_for_method(meta.method)
    if codec is None:
        raise ValueError(f"{leaf_path!r}: adapter {adapter!r} is a {meta.method!r} adapter; PEFT files written by "
                         f"save_peft hold {', '.join(peft_format.method_names())} adapters (export the merged weights "
                         f"instead)")
    if rewrites_base(meta):
        raise ValueError(
            f"{leaf_path!r}: adapter {adapter!r} was initialised with {meta.init!r}, which rewrote the base "
            f"weight into a residual; a PEFT file only holds the factors and would be applied to the original "
            f"weights. Export the merged weights (jlora.merge) instead")
    if leaf.base is None:
        raise ValueError(f"save_peft needs the full adapted tree (jlora.combine(trainable, frozen)); "
                         f"{leaf_path!r} is missing its base")
    if leaf.layout.stack > 1:
        raise ValueError(
            f"{leaf_path!r} has {leaf.layout.stack} stacked axes (layout {leaf.layout}); PEFT modules are per layer "
            f"and save_peft unstacks only one stacked axis. Reshape the stack into one axis first")
    return codec


def _one_codec(modules, adapter):
    """The one codec of all ``modules``: a PEFT file holds one method (one peft_type and one variant)."""
    by_codec: dict = {}
    for info in modules.values():
        by_codec.setdefault(info.codec, []).append(info.path)
    if len(by_codec) <= 1:
        return next(iter(by_codec), None)
    solo = [c for c in by_codec if c.solo]
    if solo:
        single = solo[0]
        other = next(c for c in by_codec if c is not single)
        raise ValueError(f"save_peft: adapter {adapter!r} is {single.title} on {by_codec[single][0]!r} but {other.kind} "
                         f"on {by_codec[other][0]!r}; a PEFT adapter file holds one method (peft_type)")
    first, second = sorted(by_codec, key=lambda c: c.title)[:2]
    raise ValueError(f"save_peft: adapter {adapter!r} mixes {first.title} ({by_codec[first][0]!r}) and {second.title} "
                     f"({by_codec[second][0]!r}) modules; both are peft_type {first.peft_type!r} files but differ in "
                     f"their config (e.g. use_dora applies to every module), so one file cannot hold both. Save them "
                     f"as two adapters (different names)")


def _target_modules(names, modules_to_save, flat, naming):
    """``target_modules``: the module-name suffixes, unless they would also catch a module we know
    of that is not adapted (then an exact regex of the adapted names)."""
    suffixes = sorted({peft_format.suffix(m) for m in names})
    known = set()
    for leaf_path, leaf in flat:
        base = leaf.base if isinstance(leaf, AdaptedWeight) else leaf.value if isinstance(leaf, Trainable) else leaf
        if getattr(base, "ndim", 0) != 2 or isinstance(leaf, Trainable) or \
                leaf_path.rsplit("/", 1)[-1] not in ("kernel", "embedding"):
            continue
        name = _try_naming(naming, leaf_path, None)
        if name is not None:
            known.add(name)
    excluded = set(modules_to_save)
    stray = sorted(m for m in known - set(names) - excluded if _target_match(suffixes, m))
    if stray:
        return "|".join(re.escape(m) for m in sorted(names))
    return suffixes


# ------------------------------------------------------------------------------------------
# load

def read_peft_config(path) -> dict:
    """The ``adapter_config.json`` of a PEFT adapter directory, checked to be a config that jlora
    can load: a ``peft_type`` a registered method codec reads ("LORA" plain or ``use_dora``,
    "ADALORA", "IA3"; checked by that codec: no lora_bias / layer replication ...) or a
    prompt-learning type."""
    path = os.path.abspath(os.fspath(path))
    file = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no PEFT adapter at {path}: {CONFIG_NAME} is missing")
    try:
        with open(file) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise PeftFormatError(f"{file} is not readable JSON: {e}") from None
    if not isinstance(config, dict):
        raise PeftFormatError(f"{file} does not hold a JSON object")
    peft_type = config.get("peft_type")
    if tree_codec_for_type(peft_type) is not None:   # checked by that form's load
        return config
    codec = peft_format.codec_for_config(config)
    if codec is None:
        raise PeftFormatError(f"{file}: unknown or unsupported peft_type {peft_type!r}; jlora.io.load_peft reads "
                              f"{', '.join(repr(t) for t in peft_format.peft_types() + tree_peft_types())} adapters")
    codec.check_config(config, file)
    return config


_LAYER_INDEX = re.compile(r"\.(?:layers|layer|h|blocks)\.(\d+)\.")


def _peft_targets(config: dict, module: str) -> bool:
    """Whether PEFT would put an adapter on ``module`` given the config's ``target_modules`` (a regex
    matched in full, else names matched exactly or as dotted suffixes; ``"all-linear"`` is every
    linear layer) and ``layers_to_transform``."""
    tm = config.get("target_modules")
    if tm is not None and tm != "all-linear" and not _target_match(tm, module):
        return False
    ltt = config.get("layers_to_transform")
    if ltt is not None and isinstance(tm, list):   # PEFT applies the layer filter to name lists only
        m = _LAYER_INDEX.search("." + module + ".")
        layers = [ltt] if isinstance(ltt, int) else ltt
        if m is None or int(m.group(1)) not in layers:
            return False
    return True


def load_peft(path, params, naming: Naming, *, adapter: str = "default", model=None, example=None):
    """Reads a PEFT LoRA, DoRA or IA3 adapter directory and returns ``params`` adapted with it.

    ``params`` are plain jlora params (a Linen dict / FrozenDict or NNX ``State``; an already
    adapted tree gets ``adapter`` added). Every floating kernel (>= 2 axes) is mapped with
    ``naming``; the PEFT modules found in the file become :class:`AdaptedWeight` s with
    ``a = lora_A.T``, ``b = lora_B.T`` (reshaped to the kernel's input / output axes) and
    ``scale = lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``; ``rank_pattern`` /
    ``alpha_pattern`` looked up as PEFT does). A stacked ``(L, ...)`` kernel gathers the L modules
    ``naming(path, i)`` and stacks their factors (ranks that differ between layers are zero-padded,
    scales that differ are folded into ``b``). Which axes are stacked / inputs / outputs comes from
    ``model=fn, example=args`` (traced like ``jlora.apply``), else from the file's shapes.
    ``modules_to_save`` (and trained biases with ``bias`` "all" / "lora_only") become
    :class:`Trainable` leaves in the params' dtype, transposes undone.

    DoRA (``use_dora``): method "dora", ``lora_magnitude_vector`` (out,) becomes ``extra["m"]``
    (stack + outputs) and ``cache["w0_sq"]`` is computed from the params' base. IA3 (``peft_type``
    "IA3"): method "ia3", ``ia3_l`` ((out, 1), or (1, in) for ``feedforward_modules``) becomes
    ``extra["l"]`` (stack + outputs / inputs) and ``AdapterMeta.feedforward`` follows the config.

    Raises :class:`PeftFormatError` naming the module that no kernel maps to, the expected and
    found shapes, or the unsupported config field.
    """
    if not callable(naming):
        raise TypeError(f"naming must be a function (path, layer) -> module name, got {naming!r}")
    if not isinstance(adapter, str) or not adapter or "/" in adapter:
        raise ValueError(f"adapter name must be a non-empty string without '/', got {adapter!r}")
    config = read_peft_config(path)
    whole_tree = tree_codec_for_type(config["peft_type"])
    if whole_tree is not None:
        return whole_tree[1](path, params, naming, config, _peft_files)
    path = os.path.abspath(os.fspath(path))
    weights_file = os.path.join(path, WEIGHTS_NAME)
    if not os.path.isfile(weights_file):
        hint = " (adapter_model.bin pickles are not read; convert with safetensors)" if os.path.isfile(
            os.path.join(path, "adapter_model.bin")) else ""
        raise FileNotFoundError(f"no PEFT adapter weights at {weights_file}{hint}")
    metadata: dict = {}
    raw = _read_safetensors(weights_file, metadata)
    _verify_integrity(weights_file, raw, metadata, config)
    tensors = {(k[len(PREFIX):] if k.startswith(PREFIX) else k): v for k, v in raw.items()}

    # -- sort the file's keys: the method's codec files its tensors per module ----------------
    codec = peft_format.codec_for_config(config)
    lora: dict[str, dict] = collections.defaultdict(dict)   # module -> what the codec collected
    extra: dict[str, np.ndarray] = {}                       # modules_to_save / bias tensors
    for key, value in tensors.items():
        if not codec.parse(key, value, lora, weights_file):
            extra[key] = value
    for module, parts in lora.items():
        codec.check_parts(module, parts, weights_file)

    outside = sorted(m for m in lora if not _peft_targets(config, m))
    if outside:   # PEFT would not create these modules, so it would load a different model than the file says
        ltt = config.get("layers_to_transform")
        where = f"target_modules={config.get('target_modules')!r}" + ("" if ltt is None else f" / layers_to_transform={ltt!r}")
        raise PeftFormatError(
            f"{weights_file}: the config's {where} leave out {len(outside)} module(s) that have weights in the file: "
            f"{outside[:4]}{' ...' if len(outside) > 4 else ''}; PEFT would skip them, so the config and the weights "
            f"disagree")

    caveat = codec.load_warning(config)   # e.g. an init that changed the base weights
    if caveat:
        warnings.warn(f"{path}: {caveat}", stacklevel=2)

    # -- map the params' kernels to module names --------------------------------------------
    flat, treedef = flatten_with_paths(params, is_leaf=is_adapter_leaf)
    inferred = {}
    if model is not None:
        if example is None:
            raise ValueError("load_peft(model=fn) also needs example=args (inputs fn is called with)")
        inferred = axes_mod.infer_layouts(model, params, example, is_leaf=is_adapter_leaf)

    placements = {}
    with_bias = []
    claimed: dict[str, str] = {}
    seen_names: list[str] = []
    for index, (leaf_path, leaf) in enumerate(flat):
        base = leaf.base if isinstance(leaf, AdaptedWeight) else leaf
        if isinstance(leaf, Trainable) or not (hasattr(base, "shape") and hasattr(base, "dtype")):
            continue
        if base.ndim < 2 or not jnp.issubdtype(base.dtype, jnp.floating) or \
                leaf_path.rsplit("/", 1)[-1] in ("bias", "scale"):  # DenseGeneral biases are 2-D
            continue
        shape = tuple(base.shape)
        layout = leaf.layout if isinstance(leaf, AdaptedWeight) else inferred.get(index)
        if layout is None and base.ndim == 2:
            layout = Layout(0, 1, 1)
        if layout is not None:
            if layout.stack > 1:
                continue
            stacked = layout.stack == 1
        else:  # N-D kernel, no model: ask the file whether it is one module or one per layer
            name = _try_naming(naming, leaf_path, None)
            stacked = not (name is not None and name in lora)
            if stacked and _try_naming(naming, leaf_path, 0) not in lora:
                if name is not None:
                    seen_names.append(name)
                continue
        layers = list(range(shape[0])) if stacked else [None]
        names = [_try_naming(naming, leaf_path, i) for i in layers]
        seen_names.extend(n for n in names if n is not None)
        present = [n for n in names if n is not None and n in lora]
        if not present:
            continue
        missing = [f"{n!r}" if n else f"layer {i} (naming raised)" for i, n in zip(layers, names) if n not in lora]
        if missing:
            raise PeftFormatError(f"{weights_file}: {leaf_path!r} is stacked over {len(layers)} layers, but the adapter "
                                  f"has no {codec.weights_title} weights for {', '.join(missing[:6])}"
                                  f"{' ...' if len(missing) > 6 else ''} (found {present[:3]})")
        for n in names:
            if n in claimed:
                raise PeftFormatError(f"naming maps both {claimed[n]!r} and {leaf_path!r} to the module {n!r}")
            claimed[n] = leaf_path
        node = codec.build(peft_format.PeftTarget(leaf_path, leaf, shape, layout, stacked, names, lora, adapter,
                                                  config, weights_file))
        placements[index] = node
        if codec.differs_on_bias(node.meta[adapter]) and any(p == leaf_path.rsplit("/", 1)[0] + "/bias" for p, _ in flat):
            with_bias.append(names[0])

    unmatched = sorted(set(lora) - set(claimed))
    if unmatched:
        closest = difflib.get_close_matches(unmatched[0], sorted(set(seen_names)), n=4, cutoff=0.3)
        raise PeftFormatError(
            f"{weights_file}: the adapter's module {unmatched[0]!r}"
            f"{f' (and {len(unmatched) - 1} more)' if len(unmatched) > 1 else ''} matches no kernel of params: "
            f"naming mapped no kernel to it. Closest module names naming produced: {closest or sorted(set(seen_names))[:4]}")
    if with_bias:
        warnings.warn(f"{path}: {codec.bias_warning(with_bias, saving=False)}", stacklevel=2)

    # -- modules_to_save / trained biases -------------------------------------------------------
    _place_modules_to_save(flat, naming, extra, placements, weights_file, PREFIX)

    if not placements:
        raise PeftFormatError(f"{weights_file} holds no tensors")
    leaves = [placements.get(i, leaf) for i, (_, leaf) in enumerate(flat)]
    return jax.tree_util.tree_unflatten(treedef, leaves)


