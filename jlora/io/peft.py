"""Hugging Face PEFT adapter files (LoRA, DoRA, IA3): export jlora adapters, import PEFT-trained ones.
(Prompt tuning / prefix tuning / P-tuning files: :mod:`jlora.io.peft_prompt`, which :func:`save_peft`
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
import dataclasses
import difflib
import json
import math
import os
import re
import struct
import sys
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jlora.core.nodes import AdaptedWeight, AdapterMeta, Layout, Trainable, dense, is_adapter_leaf
from jlora.methods.adalora import SVDState
from jlora.methods.dora import column_sq_norms
from jlora.core.paths import flatten_with_paths
from jlora.io.checkpoint import REWRITES_BASE, CheckpointError, _atomic_write, check_finite

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
_PROMPT_TYPES = ("PROMPT_TUNING", "PREFIX_TUNING", "P_TUNING")   # jlora.io.peft_prompt

Naming = Callable[[str, "int | None"], str]

__all__ = ["save_peft", "load_peft", "read_peft_config", "default_naming", "PeftFormatError",
           "CONFIG_NAME", "WEIGHTS_NAME"]


class PeftFormatError(CheckpointError):
    """A PEFT adapter directory that cannot be read or does not fit the parameters given."""


# ------------------------------------------------------------------------------------------
# naming

def default_naming(path: str, layer: int | None = None) -> str:
    """A ``naming`` function for plain Flax models whose module names equal the PyTorch ones.

    Drops a leading Linen ``params`` collection and the leaf name and joins the rest with dots
    (``'params/encoder/fc1/kernel'`` -> ``'encoder.fc1'``; NNX ``'fc1/kernel'`` -> ``'fc1'``). With
    ``layer`` the index goes after the first module name (``'params/layers/fc/kernel', 2`` ->
    ``'layers.2.fc'``), i.e. the stacked module is the top-level one.
    """
    parts = path.split("/")
    if len(parts) > 2 and parts[0] == "params":
        parts = parts[1:]
    parts = parts[:-1]
    if not parts:
        raise ValueError(f"default_naming: {path!r} has no module name (a leaf at the top level)")
    if layer is not None:
        parts = [parts[0], str(int(layer)), *parts[1:]]
    return ".".join(parts)


def _checked_name(name, path, layer):
    if not isinstance(name, str) or not name:
        raise TypeError(f"naming({path!r}, {layer!r}) must return a non-empty module name, got {name!r}")
    return name.removeprefix(PREFIX)


def _call_naming(naming, path, layer):
    return _checked_name(naming(path, layer), path, layer)


def _try_naming(naming, path, layer):
    """``naming(path, layer)``, or ``None`` when it raises (it is probed on leaves it may not know)."""
    try:
        name = naming(path, layer)
    except Exception:  # noqa: BLE001 - a naming function may reject paths it does not map
        return None
    return _checked_name(name, path, layer)


def _module_of_leaf(naming, path):
    """Module name of a non-kernel leaf (bias, scale): naming(path), else naming(<module>/kernel)."""
    name = _try_naming(naming, path, None)
    if name is None and "/" in path:
        name = _try_naming(naming, path.rsplit("/", 1)[0] + "/kernel", None)
    return name


# ------------------------------------------------------------------------------------------
# safetensors (own reader/writer: numpy has no bfloat16, safetensors.numpy cannot write it)

def _st_dtypes():
    import ml_dtypes

    table = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
             "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
             "U16": np.uint16, "U32": np.uint32, "U64": np.uint64, "BOOL": np.bool_,
             "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2}
    return {k: np.dtype(v) for k, v in table.items()}


def _write_safetensors(file, tensors: dict, metadata: dict | None = None):
    names = {v: k for k, v in _st_dtypes().items()}
    header, chunks, offset = {}, [], 0
    for key in sorted(tensors):
        arr = np.ascontiguousarray(tensors[key])
        if arr.dtype not in names:
            raise TypeError(f"cannot store {key!r} of dtype {arr.dtype} in safetensors")
        if sys.byteorder != "little":  # pragma: no cover
            arr = arr.byteswap()
        data = arr.tobytes()
        header[key] = {"dtype": names[arr.dtype], "shape": list(arr.shape),
                       "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for data in chunks:
            f.write(data)


#: adapter_config.json fields that do not change the adapter (edit them freely: e.g. point
#: base_model_name_or_path at the base model's new home); every other field is covered by the
#: record jlora writes into the safetensors metadata
_FREE_FIELDS = ("base_model_name_or_path", "revision", "inference_mode", "auto_mapping", "peft_version", "task_type")


def _config_record(config: dict) -> str:
    return json.dumps({k: v for k, v in config.items() if k not in _FREE_FIELDS}, sort_keys=True, separators=(",", ":"))


def _integrity_metadata(tensors: dict, config: dict) -> dict:
    """safetensors ``__metadata__`` jlora adds to the PEFT file it writes: a sha256 per tensor and the
    config fields that set the maths, so :func:`load_peft` can tell a damaged or edited file (PEFT
    and transformers ignore these entries)."""
    from jlora.io.checkpoint import _digests

    return {"jlora_sha256": json.dumps(_digests({k: np.ascontiguousarray(v) for k, v in tensors.items()}),
                                       sort_keys=True),
            "jlora_config": _config_record(config)}


def _verify_integrity(weights_file: str, raw: dict, metadata: dict, config: dict) -> None:
    """Checks a file jlora wrote against its own record (files from PEFT have none: nothing to check)."""
    from jlora.io.checkpoint import _digests

    if "jlora_sha256" in metadata:
        try:
            recorded = json.loads(metadata["jlora_sha256"])
        except ValueError:
            raise PeftFormatError(f"{weights_file}: its jlora_sha256 record is damaged") from None
        keys = sorted(set(recorded) | set(raw))
        bad = [k for k in keys if k not in raw or k not in recorded]
        bad += [k for k, d in _digests({k: raw[k] for k in keys if k not in bad}).items() if d != recorded[k]]
        if bad:
            raise PeftFormatError(f"{weights_file}: {len(bad)} tensor(s) differ from the sha256 recorded when jlora "
                                  f"wrote the file, it is damaged: {sorted(bad)[:4]}")
    if "jlora_config" in metadata:
        saved, now = json.loads(metadata["jlora_config"]), json.loads(_config_record(config))
        diff = sorted(k for k in set(saved) | set(now) if saved.get(k, "<absent>") != now.get(k, "<absent>"))
        if diff:
            raise PeftFormatError(
                f"{os.path.join(os.path.dirname(weights_file), CONFIG_NAME)} was edited after jlora wrote it: "
                + ", ".join(f"{k} {saved.get(k, '<absent>')!r} -> {now.get(k, '<absent>')!r}" for k in diff[:5])
                + f"; these fields set the adapter's maths (only {', '.join(_FREE_FIELDS)} may change)")


def _read_safetensors(file, metadata: dict | None = None) -> dict:
    """The tensors of a safetensors file; its ``__metadata__`` goes into ``metadata`` when given."""
    with open(file, "rb") as f:
        raw = f.read()
    try:
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8:8 + n])
    except (struct.error, ValueError) as e:
        raise PeftFormatError(f"{file} is not a safetensors file ({e})") from None
    dtypes, body, out = _st_dtypes(), 8 + n, {}
    if metadata is not None and isinstance(header.get("__metadata__"), dict):
        metadata.update(header["__metadata__"])
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype = dtypes[info["dtype"]]
            begin, end = info["data_offsets"]
            shape = tuple(int(d) for d in info["shape"])
        except (KeyError, TypeError, ValueError):
            raise PeftFormatError(f"{file}: bad safetensors entry for {key!r}: {info!r}") from None
        count = math.prod(shape)
        if end - begin != count * dtype.itemsize or body + end > len(raw):
            raise PeftFormatError(f"{file}: tensor {key!r} has inconsistent offsets {info['data_offsets']}")
        arr = np.frombuffer(raw, dtype=dtype, count=count, offset=body + begin).reshape(shape)
        if sys.byteorder != "little":  # pragma: no cover
            arr = arr.byteswap()
        out[key] = arr.copy()
    return out


# ------------------------------------------------------------------------------------------
# PEFT config helpers

def _get_pattern_key(pattern_keys, key_to_match: str) -> str:
    """``peft.utils.other.get_pattern_key``: the first pattern matching the end of the module name
    at a ``.`` boundary, else the module name itself."""
    for key in pattern_keys:
        if re.match(rf"(.*\.)?({key})$", key_to_match):
            return key
    return key_to_match


def _pattern_value(pattern: dict, module: str, default):
    return pattern.get(_get_pattern_key(list(pattern), module), default)


def _peft_scale(alpha, r, rslora) -> float:
    return float(alpha) / (math.sqrt(r) if rslora else r)


def _nice(value: float, check) -> float | int:
    """``value`` rounded to 12 significant digits (an int when whole) if ``check`` still holds."""
    short = float(f"{value:.12g}")
    if check(short):
        value = short
    return int(value) if float(value).is_integer() and abs(value) < 2 ** 53 else value


def _most_common(values):
    counts = collections.Counter(values)
    best = max(counts.values())
    return next(v for v in values if counts[v] == best)  # first seen among the most frequent


def _target_match(target_modules, module: str) -> bool:
    """PEFT's ``check_target_module_exists`` for a str (fullmatch) or a list (name or ``.name``
    suffix), without exclusions."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, module) is not None
    return module in target_modules or any(module.endswith("." + t) for t in target_modules)


def _pattern_keys(wanted: dict, default, all_modules):
    """rank_pattern / alpha_pattern keys for the modules whose value differs from ``default``.

    Keys are the full module names, so PEFT's ``(.*\\.)?(key)$`` lookup finds them; if a key
    would also catch another module (``fc`` is a suffix of ``layers.0.fc``), every key is
    anchored instead (``^fc``), which PEFT's lookup matches only at the start of the name."""
    pattern = {m: v for m, v in wanted.items() if v != default}
    if not pattern:
        return {}
    if all(_pattern_value(pattern, m, default) == wanted[m] for m in all_modules):
        return pattern
    return {"^" + re.escape(m): v for m, v in pattern.items()}


# ------------------------------------------------------------------------------------------
# jlora leaf <-> PyTorch parameter (modules_to_save)

def _to_torch_param(path: str, value) -> tuple[str, np.ndarray]:
    leaf = path.rsplit("/", 1)[-1]
    value = np.asarray(value)
    if leaf == "kernel":
        if value.ndim != 2:
            raise ValueError(
                f"modules_to_save: cannot write the {value.ndim}-D kernel {path!r} {value.shape} as a PyTorch "
                f"weight (only 2-D Dense kernels, transposed to (out, in), are supported)")
        return "weight", np.ascontiguousarray(value.T)
    if leaf in ("scale", "embedding"):  # LayerNorm/RMSNorm scale, nn.Embed table: same layout
        return "weight", value
    if leaf == "bias":
        return "bias", value.reshape(-1)
    return leaf, value


def _from_torch_param(path: str, like, value, key) -> np.ndarray:
    leaf = path.rsplit("/", 1)[-1]
    shape = tuple(np.shape(like))
    if leaf == "kernel" and len(shape) == 2:
        value = value.T
    if value.shape != shape:
        if value.size != math.prod(shape) or leaf == "kernel":
            raise PeftFormatError(f"{key}: shape mismatch for {path!r}: expected {_expected(leaf, shape)}, "
                                  f"found {tuple(value.shape)}")
        value = value.reshape(shape)
    return np.ascontiguousarray(value)


def _expected(leaf, shape):
    return f"{shape[::-1]} (PyTorch layout of kernel {shape})" if leaf == "kernel" and len(shape) == 2 else f"{shape}"


def _torch_param_name(path: str) -> str:
    leaf = path.rsplit("/", 1)[-1]
    return "weight" if leaf in ("kernel", "scale", "embedding") else leaf


def _is_embedding(path: str) -> bool:
    return path.rsplit("/", 1)[-1] == "embedding"


def _suffix(module: str) -> str:
    return module.rsplit(".", 1)[-1]


# ------------------------------------------------------------------------------------------
# save

_KINDS = {"lora": "lora", "qlora": "lora", "dora": "dora", "ia3": "ia3", "adalora": "adalora"}  # jlora -> PEFT kind


def _lora_tensors(leaf, leaf_path, adapter, kind, stack, n_in, n_out, embedding):
    """``{key suffix: array (stacked over layers when stack)}`` of a LoRA / DoRA adapter, and its rank."""
    a, b = leaf.a.get(adapter), leaf.b.get(adapter)
    if a is None or b is None:
        raise ValueError(f"save_peft needs the full adapted tree (jlora.combine(trainable, frozen)); "
                         f"{leaf_path!r} is missing the factors of adapter {adapter!r}")
    r = int(a.shape[-1])
    a = np.asarray(a).reshape(stack + (n_in, r))
    b = np.asarray(b).reshape(stack + (r, n_out))
    key_a, key_b = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A.weight", "lora_B.weight")
    out = {key_a: np.swapaxes(a, -1, -2), key_b: np.swapaxes(b, -1, -2)}  # (r, in), (out, r)
    if kind == "dora":
        if embedding:
            raise ValueError(f"{leaf_path!r}: DoRA on an embedding table is not written to PEFT files by save_peft "
                             f"(only DoRA on Linear-like kernels)")
        m = (leaf.extra.get(adapter) or {}).get("m")
        if m is None:
            raise ValueError(f"{leaf_path!r}: DoRA adapter {adapter!r} has no magnitude (extra[{adapter!r}]['m'])"
                             f"{'; pass the full adapted tree (jlora.combine(trainable, frozen))' if adapter in leaf.extra else ''}")
        m = np.asarray(m)
        if m.shape != stack + tuple(leaf.layout.split(leaf.shape)[2]):
            raise ValueError(f"{leaf_path!r}: DoRA magnitude of shape {m.shape}, expected stack + outputs "
                             f"{stack + tuple(leaf.layout.split(leaf.shape)[2])}")
        out["lora_magnitude_vector"] = m.reshape(stack + (n_out,))  # (out,): PEFT's key has no .weight
    return out, r


def _ia3_tensors(leaf, leaf_path, adapter, meta, stack, n_in, n_out, embedding):
    """``{"ia3_l": array}``: PEFT's (out, 1) for output scaling, (1, in) for feed-forward (input) scaling."""
    if embedding:
        raise ValueError(f"{leaf_path!r}: IA3 on an embedding table has no PEFT form (PEFT's IA3 adapts Linear layers)")
    l = (leaf.extra.get(adapter) or {}).get("l")
    if l is None:
        raise ValueError(f"{leaf_path!r}: adapter {adapter!r} is an 'ia3' adapter with no scale vector "
                         f"(extra[{adapter!r}]['l']); pass the full adapted tree (jlora.combine(trainable, frozen))")
    l = np.asarray(l)
    n = n_in if meta.feedforward else n_out
    if l.size != math.prod(stack) * n:
        raise ValueError(f"{leaf_path!r}: IA3 scales of shape {l.shape}, expected stack + "
                         f"{'inputs' if meta.feedforward else 'outputs'} ({math.prod(stack) * n} values)")
    return {"ia3_l": l.reshape(stack + ((1, n) if meta.feedforward else (n, 1)))}


def _adalora_tensors(leaf, leaf_path, adapter, stack, n_in, n_out, embedding):
    """AdaLoRA's ``lora_A`` (k, in), ``lora_E`` (k, 1), ``lora_B`` (out, k) per layer (lists for a
    stacked kernel: the kept rank k may differ per layer), keeping the triplets whose singular
    value is non-zero (all of them when none is: an untrained adapter), and the kept masks."""
    if embedding:
        raise ValueError(f"{leaf_path!r}: AdaLoRA on an embedding table has no PEFT form (PEFT's AdaLoRA adapts Linear)")
    a, b = leaf.a.get(adapter), leaf.b.get(adapter)
    e = (leaf.extra.get(adapter) or {}).get("e")
    if a is None or b is None or e is None:
        raise ValueError(f"save_peft needs the full adapted tree (jlora.combine(trainable, frozen)); "
                         f"{leaf_path!r} is missing the factors or singular values of adapter {adapter!r}")
    r = int(a.shape[-1])
    a = np.asarray(a).reshape((-1, n_in, r))
    b = np.asarray(b).reshape((-1, r, n_out))
    e = np.asarray(e).reshape((-1, r))
    out, masks = {"lora_A": [], "lora_E": [], "lora_B": []}, []
    for i in range(a.shape[0]):
        keep = e[i] != 0
        if not keep.any():
            keep = np.ones_like(keep)
        out["lora_A"].append(a[i].T[keep])
        out["lora_E"].append(e[i][keep][:, None])
        out["lora_B"].append(b[i].T[:, keep])
        masks.append(keep.tolist())
    if not stack:
        return {k: v[0] for k, v in out.items()}, r, masks[0]
    return out, r, masks


def _provenance(base_model_name_or_path, revision) -> dict:
    """PEFT's ``base_model_name_or_path`` / ``revision`` config fields, checked: each is None or a
    non-empty str (PEFT hands them to ``from_pretrained`` as the base model's repo id or local
    directory, and its git revision)."""
    out = {}
    for name, value in (("base_model_name_or_path", base_model_name_or_path), ("revision", revision)):
        if value is not None and (not isinstance(value, str) or not value.strip()):
            what = ("a Hub repo id or a local directory (str(path))" if name == "base_model_name_or_path"
                    else "a branch, tag or commit of the base model")
            raise ValueError(f"save_peft: {name} must be None or a non-empty str ({what}), got {value!r}")
        out[name] = value
    return out


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
    if isinstance(adapted, collections.abc.Mapping) and "jlora_prompt" in adapted:   # prompt / prefix / P-tuning
        from jlora.io.peft_prompt import save_peft_prompt

        return save_peft_prompt(path, adapted, naming, base_model_name_or_path=base_model_name_or_path,
                                revision=revision, task_type=task_type, overwrite=overwrite)
    flat, _ = flatten_with_paths(adapted, is_leaf=is_adapter_leaf)
    tensors: dict[str, np.ndarray] = {}
    modules: dict[str, tuple] = {}  # module -> (rank, scale, dropout, jlora path, kind, feedforward)
    patterns: dict[str, list] = {}  # AdaLoRA: module -> kept mask over the node's rank
    others_with_adapter = []
    ia3_with_bias = []

    def claim(module, where):
        if module in modules or any(k.startswith(f"{PREFIX}{module}.") for k in tensors):
            raise ValueError(f"naming maps {where} to the module {module!r}, which another leaf already uses")

    leaf_paths = {p for p, _ in flat}
    for leaf_path, leaf in flat:
        if isinstance(leaf, AdaptedWeight):
            if adapter not in leaf.names:
                if leaf.adapters:
                    others_with_adapter.append(leaf_path)
                continue
            meta = leaf.meta[adapter]
            if leaf_path.rsplit("/", 1)[-1] in ("bias", "scale"):
                raise ValueError(f"{leaf_path!r} carries a LoRA adapter, but PEFT adapts only module weights (kernels, "
                                 f"embeddings); narrow the spec's targets (e.g. r'.*/fc/kernel')")
            kind = _KINDS.get(meta.method)
            if kind is None:
                raise ValueError(f"{leaf_path!r}: adapter {adapter!r} is a {meta.method!r} adapter; PEFT files written by "
                                 f"save_peft hold LoRA / QLoRA (as LoRA), DoRA (use_dora) or IA3 adapters")
            if meta.init in REWRITES_BASE:
                raise ValueError(
                    f"{leaf_path!r}: adapter {adapter!r} was initialised with {meta.init!r}, which rewrote the base "
                    f"weight into a residual; a PEFT file only holds the factors and would be applied to the original "
                    f"weights. Export the merged weights (jlora.merge) instead")
            if leaf.base is None:
                raise ValueError(f"save_peft needs the full adapted tree (jlora.combine(trainable, frozen)); "
                                 f"{leaf_path!r} is missing its base")
            layout = leaf.layout
            if layout.stack > 1:
                raise ValueError(
                    f"{leaf_path!r} has {layout.stack} stacked axes (layout {layout}); PEFT modules are per layer and "
                    f"save_peft unstacks only one stacked axis. Reshape the stack into one axis first")
            stack, inputs, outputs = layout.split(leaf.shape)
            n_in, n_out = math.prod(inputs), math.prod(outputs)
            embedding = _is_embedding(leaf_path)
            n_layers = stack[0] if stack else None
            masks = None
            if kind == "adalora":
                per_layer, rank, masks = _adalora_tensors(leaf, leaf_path, adapter, stack, n_in, n_out, embedding)
            elif kind == "ia3":
                per_layer = _ia3_tensors(leaf, leaf_path, adapter, meta, stack, n_in, n_out, embedding)
                rank = 0
                if not meta.feedforward and f"{leaf_path.rsplit('/', 1)[0]}/bias" in leaf_paths:
                    ia3_with_bias.append(leaf_path)
            else:
                per_layer, rank = _lora_tensors(leaf, leaf_path, adapter, kind, stack, n_in, n_out, embedding)
            for layer in ([None] if n_layers is None else range(n_layers)):
                module = _call_naming(naming, leaf_path, layer)
                claim(module, f"{leaf_path!r}" + ("" if layer is None else f" layer {layer}"))
                for suffix, arrays in per_layer.items():
                    key = f"{PREFIX}{module}.{suffix}"
                    tensors[key] = np.ascontiguousarray(arrays if layer is None else arrays[layer])
                modules[module] = (rank, float(meta.scale), float(meta.dropout), leaf_path, kind,
                                   bool(meta.feedforward))
                if masks is not None:
                    patterns[module] = masks if layer is None else masks[layer]
        elif isinstance(leaf, Trainable):
            continue
        elif is_adapter_leaf(leaf):
            raise ValueError(f"save_peft cannot export {type(leaf).__name__} at {leaf_path!r} (only LoRA nodes)")

    kinds = collections.defaultdict(list)
    for module, info in modules.items():
        kinds[info[4]].append(info[3])
    for single in ("ia3", "adalora"):
        if single in kinds and len(kinds) > 1:
            other = next(k for k in kinds if k != single)
            shown = {"ia3": "IA3", "adalora": "AdaLoRA"}[single]
            raise ValueError(f"save_peft: adapter {adapter!r} is {shown} on {kinds[single][0]!r} but {other} on "
                             f"{kinds[other][0]!r}; a PEFT adapter file holds one method (peft_type)")
    if "dora" in kinds and "lora" in kinds:
        raise ValueError(f"save_peft: adapter {adapter!r} mixes DoRA ({kinds['dora'][0]!r}) and plain LoRA "
                         f"({kinds['lora'][0]!r}) modules; PEFT's use_dora applies to every module of a LoRA file, "
                         f"so one file cannot hold both. Save them as two adapters (different names)")
    if ia3_with_bias:
        import warnings

        warnings.warn(f"save_peft: IA3 scales the outputs of {ia3_with_bias[:3]}{' ...' if len(ia3_with_bias) > 3 else ''}, "
                      f"which have a bias; PEFT's IA3 also scales the bias (y = (x W + b) * l), jlora does not "
                      f"(y = (x W) * l + b), so the PEFT model's outputs differ by b * (l - 1)", stacklevel=2)

    lora_biases: list[str] = []
    save_modules = _modules_to_save_tensors(flat, naming, tensors, PREFIX, adapted_modules=modules,
                                            lora_biases=lora_biases)

    if not modules:
        hint = f" (nodes carry other adapters: {others_with_adapter[:4]})" if others_with_adapter else ""
        extra = (" PEFT cannot load an adapter that only has modules_to_save (the Trainable leaves)"
                 if save_modules else " Did you pass the plain params?")
        raise ValueError(f"save_peft: no LoRA node carries an adapter named {adapter!r}{hint}.{extra}")

    if "adalora" in kinds:
        config = _make_adalora_config(modules, patterns, sorted(set(save_modules)), flat, naming, spec,
                                      provenance, task_type)
    elif "ia3" in kinds:
        config = _make_ia3_config(modules, sorted(set(save_modules)), flat, naming, provenance, task_type)
    else:
        config = _make_config(modules, sorted(set(save_modules)), flat, naming, spec,
                              provenance, task_type, use_dora="dora" in kinds)
    if lora_biases:
        if "ia3" in kinds:
            raise ValueError(f"save_peft: IA3 files hold no trained biases; {lora_biases[:3]} train theirs")
        config["bias"] = "lora_only"
    return _write_adapter_dir(path, overwrite, tensors, config)


def _write_adapter_dir(path, overwrite, tensors, config) -> str:
    """Atomically writes ``adapter_model.safetensors`` + ``adapter_config.json`` at ``path``;
    refuses (:class:`jlora.io.checkpoint.NonFiniteError`) tensors holding NaN or Inf."""
    check_finite(tensors, f"save_peft({os.fspath(path)!r})")
    text = json.dumps(config, indent=2, sort_keys=True)

    def write(target):
        os.makedirs(target)
        _write_safetensors(os.path.join(target, WEIGHTS_NAME), tensors,
                           {"format": "pt", **_integrity_metadata(tensors, config)})
        with open(os.path.join(target, CONFIG_NAME), "w") as f:
            f.write(text)

    return _atomic_write(path, overwrite, write)


def _modules_to_save_tensors(flat, naming, tensors, prefix, adapted_modules=(), lora_biases=None):
    """``modules_to_save``: writes every parameter of each module holding a ``Trainable`` leaf into
    ``tensors`` (keys ``prefix + <module>.<param>``, PyTorch layout); returns the module names. A LoRA
    module whose only Trainable leaf is its bias is written as PEFT's ``bias="lora_only"`` does
    (``<module>.base_layer.bias``) and its name appended to ``lora_biases``."""
    lora_biases = [] if lora_biases is None else lora_biases
    by_parent = collections.defaultdict(list)
    for leaf_path, leaf in flat:
        by_parent[leaf_path.rsplit("/", 1)[0] if "/" in leaf_path else ""].append((leaf_path, leaf))
    save_modules = []
    for parent, leaves in by_parent.items():
        if not any(isinstance(leaf, Trainable) for _, leaf in leaves):
            continue
        first = next(p for p, leaf in leaves if isinstance(leaf, Trainable))
        module = _module_of_leaf(naming, first)
        if module is None:
            module = _call_naming(naming, first, None)  # raises the naming function's own error
        if module in adapted_modules:
            trained = [p for p, leaf in leaves if isinstance(leaf, Trainable)]
            if trained == [f"{parent}/bias" if parent else "bias"]:   # LoRA + its bias: PEFT's bias="lora_only"
                value = leaves[[p for p, _ in leaves].index(trained[0])][1].value
                if value is None:
                    raise ValueError(f"save_peft needs the full adapted tree (jlora.combine(trainable, frozen)); "
                                     f"{trained[0]!r} holds no value")
                tensors[f"{prefix}{module}.base_layer.bias"] = np.asarray(value).reshape(-1)
                lora_biases.append(module)
                continue
            raise ValueError(f"module {module!r} both carries LoRA and is trained in full ({first!r}); PEFT "
                             f"excludes modules_to_save from LoRA targeting (a trained bias alone is written as "
                             f"bias='lora_only')")
        for leaf_path, leaf in leaves:
            if isinstance(leaf, AdaptedWeight):
                raise ValueError(f"{leaf_path!r} carries an adapter but its module {module!r} is trained in full "
                                 f"({first!r}); PEFT cannot express both")
            value = leaf.value if isinstance(leaf, Trainable) else leaf
            if value is None:
                raise ValueError(f"save_peft needs the full adapted tree (jlora.combine(trainable, frozen)); "
                                 f"{leaf_path!r} holds no value")
            if not (hasattr(value, "shape") and hasattr(value, "dtype")):
                continue
            name, tensor = _to_torch_param(leaf_path, value)
            key = f"{prefix}{module}.{name}"
            if key in tensors:
                raise ValueError(f"two leaves of {parent!r} map to the same PyTorch parameter {key!r}")
            tensors[key] = tensor
        save_modules.append(module)
    return save_modules


def _make_config(modules, modules_to_save, flat, naming, spec, provenance, task_type, use_dora=False):
    rslora = bool(getattr(spec, "rslora", False)) if spec is not None else False
    names = list(modules)
    ranks = {m: modules[m][0] for m in names}
    scales = {m: modules[m][1] for m in names}
    alphas = {}
    for m in names:
        r, s = ranks[m], scales[m]
        alphas[m] = _nice(s * (math.sqrt(r) if rslora else r),
                          lambda v, r=r, s=s: math.isclose(_peft_scale(v, r, rslora), s, rel_tol=1e-13, abs_tol=0.0))
    r = _most_common([ranks[m] for m in names])
    alpha = _most_common([alphas[m] for m in names])
    dropout = _most_common([modules[m][2] for m in names])
    rank_pattern = _pattern_keys(ranks, r, names)
    alpha_pattern = _pattern_keys(alphas, alpha, names)

    target_modules = _target_modules(names, modules_to_save, flat, naming)
    return {
        "alpha_pattern": alpha_pattern,
        "auto_mapping": None,
        **provenance,                                    # base_model_name_or_path, revision
        "bias": "none",
        "exclude_modules": None,
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "layer_replication": None,
        "layers_pattern": None,
        "layers_to_transform": None,
        "loftq_config": {},
        "lora_alpha": alpha,
        "lora_bias": False,
        "lora_dropout": dropout,
        "megatron_config": None,
        "megatron_core": "megatron.core",
        "modules_to_save": modules_to_save or None,
        "peft_type": "LORA",
        "r": r,
        "rank_pattern": rank_pattern,
        "target_modules": target_modules,
        "task_type": task_type,
        "use_dora": bool(use_dora),
        "use_rslora": rslora,
    }


def _make_adalora_config(modules, patterns, modules_to_save, flat, naming, spec, provenance, task_type):
    """``AdaLoraConfig``: PEFT scales by ``lora_alpha / (ranknum + 1e-5)`` with ``ranknum = init_r``
    (kept when a rank-pattern-truncated adapter is loaded), so ``init_r`` is the spec's (else the
    largest node rank) and ``lora_alpha = scale * (init_r + 1e-5)``. ``rank_pattern`` (``<module>.lora_E``
    -> kept mask over ``init_r``) makes PEFT resize each module to the triplets in the file."""
    from jlora.methods.adalora import AdaLoRA

    names = list(modules)
    scales = {modules[m][1] for m in names}
    if len(scales) > 1:
        raise ValueError(f"save_peft: AdaLoRA modules have different scales {sorted(scales)}; an AdaLoraConfig has "
                         f"one lora_alpha")
    ada = spec if isinstance(spec, AdaLoRA) else None
    init_r = int(ada.init_r) if ada is not None else max(modules[m][0] for m in names)
    too_big = [m for m in names if modules[m][0] > init_r]
    if too_big:
        raise ValueError(f"save_peft: AdaLoRA module {too_big[0]!r} has rank {modules[too_big[0]][0]} > init_r {init_r}")
    scale = scales.pop()
    rank_pattern = {f"{m}.lora_E": list(patterns[m]) + [False] * (init_r - len(patterns[m])) for m in names}
    total = int(ada.total_steps) if ada is not None and ada.total_steps else 1
    return {
        "alpha_pattern": {}, "auto_mapping": None, **provenance,
        "beta1": float(ada.beta1) if ada else 0.85, "beta2": float(ada.beta2) if ada else 0.85, "bias": "none",
        "deltaT": int(ada.delta_t) if ada else 1, "exclude_modules": None, "fan_in_fan_out": False,
        "inference_mode": True, "init_lora_weights": True, "init_r": init_r, "layers_pattern": None,
        "layers_to_transform": None, "lora_alpha": scale * (init_r + 1e-5), "lora_dropout": _most_common(
            [modules[m][2] for m in names]), "modules_to_save": modules_to_save or None,
        "orth_reg_weight": float(ada.orth_reg_weight) if ada else 0.5, "peft_type": "ADALORA", "r": 8,
        "rank_pattern": rank_pattern, "target_modules": _target_modules(names, modules_to_save, flat, naming),
        "target_r": int(ada.target_r) if ada else min(init_r, 8), "task_type": task_type,
        "tfinal": int(ada.tfinal) if ada else 0, "tinit": int(ada.tinit) if ada else 0, "total_step": total,
        "use_dora": False, "use_rslora": False,
    }


def _target_modules(names, modules_to_save, flat, naming):
    """``target_modules``: the module-name suffixes, unless they would also catch a module we know
    of that is not adapted (then an exact regex of the adapted names)."""
    suffixes = sorted({_suffix(m) for m in names})
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


def _ia3_feedforward_match(feedforward_modules, module: str) -> bool:
    """PEFT's ``IA3Model._check_target_module_feedforward``: a str is a fullmatch regex, a list
    matches a plain suffix (``key.endswith(name)``, no ``.`` boundary)."""
    if feedforward_modules is None:
        return False
    if isinstance(feedforward_modules, str):
        return re.fullmatch(feedforward_modules, module) is not None
    return any(module.endswith(f) for f in feedforward_modules)


def _make_ia3_config(modules, modules_to_save, flat, naming, provenance, task_type):
    names = list(modules)
    target_modules = _target_modules(names, modules_to_save, flat, naming)
    ff = sorted(m for m in names if modules[m][5])
    # feedforward_modules: the feed-forward modules' suffixes when PEFT's (dot-less) suffix test
    # then picks exactly them, else an exact regex (a str skips PEFT's subset-of-targets check)
    feedforward = sorted({_suffix(m) for m in ff})
    if isinstance(target_modules, str) or \
            any(_ia3_feedforward_match(feedforward, m) != modules[m][5] for m in names):
        feedforward = "|".join(re.escape(m) for m in ff) if ff else []
    return {
        "auto_mapping": None,
        **provenance,                                    # base_model_name_or_path, revision
        "exclude_modules": None,
        "fan_in_fan_out": False,
        "feedforward_modules": feedforward,
        "inference_mode": True,
        "init_ia3_weights": True,
        "modules_to_save": modules_to_save or None,
        "peft_type": "IA3",
        "target_modules": target_modules,
        "task_type": task_type,
    }


# ------------------------------------------------------------------------------------------
# load

_UNSUPPORTED = {
    "lora_bias": "LoRA B biases (lora_bias=true)",
    "layer_replication": "layer_replication",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
    "target_parameters": "target_parameters (LoRA on raw parameters)",
    "use_qalora": "QA-LoRA (use_qalora=true)",
    "use_bdlora": "BD-LoRA (use_bdlora)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "arrow_config": "Arrow routing (arrow_config)",
}


def read_peft_config(path) -> dict:
    """The ``adapter_config.json`` of a PEFT adapter directory, checked to be a config that jlora
    can load: ``peft_type`` "LORA" (plain or ``use_dora``; no lora_bias / layer replication ...)
    or "IA3"."""
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
    if str(peft_type).upper() not in ("LORA", "IA3", "ADALORA") + _PROMPT_TYPES:
        raise PeftFormatError(f"{file}: unknown or unsupported peft_type {peft_type!r}; jlora.io.load_peft reads "
                              f"'LORA' (LoRA, DoRA), 'ADALORA', 'IA3' and prompt-learning ({', '.join(_PROMPT_TYPES)}) adapters")
    if str(peft_type).upper() in _PROMPT_TYPES:
        return config
    if str(peft_type).upper() == "IA3":
        ff = config.get("feedforward_modules")
        if ff is not None and not isinstance(ff, (str, list)):
            raise PeftFormatError(f"{file}: feedforward_modules must be a list of names or a regex string, got {ff!r}")
        return config
    for field, what in _UNSUPPORTED.items():
        if config.get(field):
            raise PeftFormatError(f"{file}: {what} is not supported by jlora.io.load_peft ({field}={config[field]!r})")
    _check_config_fields(config, file)
    return config


def _check_config_fields(config: dict, file: str) -> None:
    """The LoRA / AdaLoRA fields that set the adapter's maths, type-checked (an edited or hand-written
    config must not load as something else): ``r`` a positive int, ``lora_alpha`` a finite number,
    ``use_rslora`` / ``use_dora`` booleans, patterns mappings, ``target_modules`` a regex or names."""
    def bad(field, expected):
        raise PeftFormatError(f"{file}: {field} must be {expected}, got {config[field]!r}")

    if "r" in config and (not isinstance(config["r"], int) or isinstance(config["r"], bool) or config["r"] < 1):
        bad("r", "a positive integer")
    if "lora_alpha" in config and (isinstance(config["lora_alpha"], bool) or not isinstance(config["lora_alpha"], (int, float))
                                   or not math.isfinite(config["lora_alpha"])):
        bad("lora_alpha", "a finite number")
    for field in ("use_rslora", "use_dora"):
        if config.get(field) is not None and not isinstance(config[field], bool):
            bad(field, "true or false")
    for field in ("rank_pattern", "alpha_pattern"):
        if config.get(field) is not None and not isinstance(config[field], dict):
            bad(field, "a mapping of module patterns")
    tm = config.get("target_modules")
    if tm is not None and not isinstance(tm, str) and not (isinstance(tm, list) and all(isinstance(t, str) for t in tm)):
        bad("target_modules", "a regex string or a list of module names")
    ltt = config.get("layers_to_transform")
    if ltt is not None and not isinstance(ltt, int) and not (isinstance(ltt, list) and all(isinstance(i, int) for i in ltt)):
        bad("layers_to_transform", "a layer index or a list of them")


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


def _split_layout(rest, n_in, n_out, path):
    """The (inputs, outputs) split of the non-stacked axes ``rest`` with the given flat sizes."""
    fits = [k for k in range(1, len(rest)) if math.prod(rest[:k]) == n_in and math.prod(rest[k:]) == n_out]
    if not fits:
        return None
    if len(fits) > 1:
        raise PeftFormatError(f"{path!r} {rest}: cannot tell which axes are inputs ({n_in} features) and outputs "
                              f"({n_out}); pass model=fn, example=args to load_peft")
    return fits[0]


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
    if str(config["peft_type"]).upper() in _PROMPT_TYPES:
        from jlora.io.peft_prompt import load_peft_prompt

        return load_peft_prompt(path, params, naming, config)
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

    # -- sort the file's keys --------------------------------------------------------------
    ia3_file = str(config.get("peft_type")).upper() == "IA3"
    ada_file = str(config.get("peft_type")).upper() == "ADALORA"
    use_dora = bool(config.get("use_dora", False)) and not ia3_file and not ada_file
    # module -> {"A": arr, "B": arr, "embedding": bool, "M": magnitude} (LoRA / DoRA) or {"L": arr} (IA3)
    lora: dict[str, dict] = collections.defaultdict(dict)
    extra: dict[str, np.ndarray] = {}
    for key, value in tensors.items():
        if ia3_file:
            m = re.fullmatch(r"(.+)\.ia3_l", key)
            if m:
                lora[m.group(1)]["L"] = value
            elif re.search(r"\.(lora_[A-Za-z_]+|ia3_[A-Za-z_]+)\b", key):
                raise PeftFormatError(f"{weights_file}: unrecognised tensor {key!r} in an IA3 adapter (expected "
                                      f"<module>.ia3_l)")
            else:
                extra[key] = value
            continue
        if ada_file:   # AdaLoRA: <module>.lora_A (k, in), .lora_E (k, 1), .lora_B (out, k); ranknum = init_r
            m = re.fullmatch(r"(.+)\.lora_(A|B|E)", key)
            if m:
                lora[m.group(1)][m.group(2)] = value
            elif not re.fullmatch(r".+\.ranknum", key):
                if re.search(r"\.lora_[A-Za-z_]+\b", key):
                    raise PeftFormatError(f"{weights_file}: unrecognised AdaLoRA tensor {key!r}")
                extra[key] = value
            continue
        m = re.fullmatch(r"(.+)\.(lora_A|lora_B)\.weight", key) or re.fullmatch(r"(.+)\.(lora_embedding_A|lora_embedding_B)", key)
        dora = re.fullmatch(r"(.+)\.lora_magnitude_vector(\.weight)?", key)
        if m:
            module, kind = m.group(1), m.group(2)
            lora[module][kind[-1]] = value
            lora[module]["embedding"] = kind.startswith("lora_embedding")
        elif dora:
            if not use_dora:
                raise PeftFormatError(f"{weights_file}: {key!r} is a DoRA magnitude, but the config has "
                                      f"use_dora={config.get('use_dora')!r}")
            lora[dora.group(1)]["M"] = value
        elif re.fullmatch(r".+\.lora_B\.bias", key):
            raise PeftFormatError(f"{weights_file}: {key!r} belongs to a LoRA variant jlora does not load (lora_bias)")
        elif re.search(r"\.lora_[A-Za-z_]+\b", key):
            raise PeftFormatError(f"{weights_file}: unrecognised LoRA tensor {key!r}")
        else:
            extra[key] = value
    for module, parts in lora.items():
        if ia3_file:
            continue
        if ada_file and "E" not in parts:
            raise PeftFormatError(f"{weights_file}: AdaLoRA module {module!r} has no lora_E")
        for part in ("A", "B"):
            if part not in parts:
                if "M" in parts and not ({"A", "B"} & set(parts)):
                    raise PeftFormatError(f"{weights_file}: module {module!r} has a DoRA lora_magnitude_vector but no "
                                          f"lora_A / lora_B")
                raise PeftFormatError(f"{weights_file}: module {module!r} has lora_{'AB'.replace(part, '')} but no lora_{part}")
        if use_dora and "M" not in parts:
            raise PeftFormatError(f"{weights_file}: the config has use_dora=true (DoRA) but module {module!r} has no "
                                  f"lora_magnitude_vector")
        if use_dora and parts.get("embedding"):
            raise PeftFormatError(f"{weights_file}: module {module!r}: DoRA on an embedding (lora_embedding_A/B) is not "
                                  f"supported by jlora.io.load_peft")

    outside = sorted(m for m in lora if not _peft_targets(config, m))
    if outside:   # PEFT would not create these modules, so it would load a different model than the file says
        ltt = config.get("layers_to_transform")
        where = f"target_modules={config.get('target_modules')!r}" + ("" if ltt is None else f" / layers_to_transform={ltt!r}")
        raise PeftFormatError(
            f"{weights_file}: the config's {where} leave out {len(outside)} module(s) that have weights in the file: "
            f"{outside[:4]}{' ...' if len(outside) > 4 else ''}; PEFT would skip them, so the config and the weights "
            f"disagree")

    r_default = int(config.get("r", 8))
    alpha_default = config.get("lora_alpha", 8)
    rslora = bool(config.get("use_rslora", False))
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    dropout = float(config.get("lora_dropout", 0.0) or 0.0)
    if str(config.get("init_lora_weights")).lower() in ("pissa", "olora", "corda", "eva", "loftq") or \
            str(config.get("init_lora_weights")).lower().startswith("pissa"):
        import warnings

        warnings.warn(f"{path}: this adapter was initialised with init_lora_weights={config['init_lora_weights']!r}, "
                      f"which changes the base weights; unless it was saved with path_initial_model_for_weight_conversion "
                      f"it only reproduces the trained model on top of those changed weights", stacklevel=2)

    # -- map the params' kernels to module names --------------------------------------------
    flat, treedef = flatten_with_paths(params, is_leaf=is_adapter_leaf)
    inferred = {}
    if model is not None:
        if example is None:
            raise ValueError("load_peft(model=fn) also needs example=args (inputs fn is called with)")
        from jlora.core import axes as axes_mod

        inferred = axes_mod.infer_layouts(model, params, example, is_leaf=is_adapter_leaf)

    placements = {}
    ia3_with_bias = []
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
                                  f"has no {'IA3' if ia3_file else 'LoRA'} weights for {', '.join(missing[:6])}"
                                  f"{' ...' if len(missing) > 6 else ''} (found {present[:3]})")
        for n in names:
            if n in claimed:
                raise PeftFormatError(f"naming maps both {claimed[n]!r} and {leaf_path!r} to the module {n!r}")
            claimed[n] = leaf_path
        if isinstance(leaf, AdaptedWeight) and leaf.adapters:
            methods = sorted({m.method for _, m in leaf.adapters})
            if ia3_file or "ia3" in methods:
                raise PeftFormatError(f"{leaf_path!r} already carries {methods} adapters; IA3 cannot be combined with "
                                      f"other adapters on one kernel (load onto the plain params)")
        if ia3_file:
            placements[index] = _build_ia3_node(leaf_path, leaf, shape, layout, stacked, names, lora, adapter,
                                                config.get("feedforward_modules"), weights_file)
            if not placements[index].meta[adapter].feedforward and \
                    any(p == leaf_path.rsplit("/", 1)[0] + "/bias" for p, _ in flat):
                ia3_with_bias.append(names[0])
            continue
        if ada_file:
            placements[index] = _build_adalora_node(leaf_path, leaf, shape, layout, stacked, names, lora, adapter,
                                                    config, dropout, weights_file)
            continue
        placements[index] = _build_node(leaf_path, leaf, shape, layout, stacked, names, lora, adapter,
                                        r_default, alpha_default, rslora, rank_pattern, alpha_pattern, dropout,
                                        weights_file, use_dora)

    unmatched = sorted(set(lora) - set(claimed))
    if unmatched:
        closest = difflib.get_close_matches(unmatched[0], sorted(set(seen_names)), n=4, cutoff=0.3)
        raise PeftFormatError(
            f"{weights_file}: the adapter's module {unmatched[0]!r}"
            f"{f' (and {len(unmatched) - 1} more)' if len(unmatched) > 1 else ''} matches no kernel of params: "
            f"naming mapped no kernel to it. Closest module names naming produced: {closest or sorted(set(seen_names))[:4]}")
    if ia3_with_bias:
        import warnings

        warnings.warn(f"{path}: PEFT's IA3 scales the outputs of {ia3_with_bias[:3]}"
                      f"{' ...' if len(ia3_with_bias) > 3 else ''} including their bias (y = (x W + b) * l); jlora's IA3 "
                      f"leaves the bias unscaled (y = (x W) * l + b), so outputs differ by b * (l - 1)", stacklevel=2)

    # -- modules_to_save / trained biases -------------------------------------------------------
    _place_modules_to_save(flat, naming, extra, placements, weights_file, PREFIX)

    if not placements:
        raise PeftFormatError(f"{weights_file} holds no tensors")
    leaves = [placements.get(i, leaf) for i, (_, leaf) in enumerate(flat)]
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _place_modules_to_save(flat, naming, extra, placements, weights_file, prefix):
    """Puts the file's ``modules_to_save`` / bias tensors ``extra`` (``{<module>.<param>: array}``)
    into ``placements`` as :class:`Trainable` leaves, transposes undone."""
    if not extra:
        return
    by_key = {}
    for index, (leaf_path, leaf) in enumerate(flat):
        value = leaf.value if isinstance(leaf, Trainable) else leaf
        if isinstance(leaf, AdaptedWeight) or not (hasattr(value, "shape") and hasattr(value, "dtype")):
            continue
        module = _module_of_leaf(naming, leaf_path)
        if module is not None:
            by_key.setdefault(f"{module}.{_torch_param_name(leaf_path)}", index)
            if _torch_param_name(leaf_path) == "bias":  # bias="all"/"lora_only": <module>.base_layer.bias
                by_key.setdefault(f"{module}.base_layer.bias", index)
    for key, value in sorted(extra.items()):
        if key not in by_key:
            closest = difflib.get_close_matches(key, sorted(by_key), n=4, cutoff=0.3)
            raise PeftFormatError(f"{weights_file}: {prefix}{key} (modules_to_save / bias) matches no leaf of "
                                  f"params; closest: {closest}")
        index = by_key[key]
        if index in placements:
            raise PeftFormatError(f"{weights_file}: {key!r} targets {flat[index][0]!r}, which also carries an adapter")
        leaf_path, leaf = flat[index]
        like = leaf.value if isinstance(leaf, Trainable) else leaf
        arr = _from_torch_param(leaf_path, like, value, f"{weights_file}: {prefix}{key}")
        placements[index] = Trainable(jnp.asarray(arr, dtype=like.dtype), leaf_path)


def _build_node(leaf_path, leaf, shape, layout, stacked, names, lora, adapter, r_default, alpha_default, rslora,
                rank_pattern, alpha_pattern, dropout, weights_file, use_dora=False, fixed_scale=None):
    rest = shape[1:] if stacked else shape
    embedding = {bool(lora[n].get("embedding")) for n in names}
    if len(embedding) > 1:
        raise PeftFormatError(f"{weights_file}: the layers of {leaf_path!r} mix Linear and Embedding LoRA weights")
    first_a, first_b = lora[names[0]]["A"], lora[names[0]]["B"]
    if first_a.ndim != 2 or first_b.ndim != 2:
        raise PeftFormatError(f"{weights_file}: {names[0]!r}: expected 2-D lora_A / lora_B, found shapes "
                              f"{first_a.shape} and {first_b.shape} (convolution LoRA is not supported)")
    if layout is None:
        k = _split_layout(rest, first_a.shape[1], first_b.shape[0], leaf_path)
        if k is None:
            raise PeftFormatError(f"{weights_file}: shape mismatch for module {names[0]!r} (params {leaf_path!r} "
                                  f"{shape}): found lora_A {first_a.shape}, lora_B {first_b.shape}, which fit no "
                                  f"split of {rest} into inputs x outputs")
        layout = Layout(1 if stacked else 0, k, len(rest) - k)
    _, inputs, outputs = layout.split(shape)
    n_in, n_out = math.prod(inputs), math.prod(outputs)

    factors, ranks, scales = [], [], []
    for n in names:
        a, b = lora[n]["A"], lora[n]["B"]
        r = a.shape[0] if a.ndim == 2 else -1
        if a.ndim != 2 or b.ndim != 2 or a.shape != (r, n_in) or b.shape != (n_out, r):
            raise PeftFormatError(
                f"{weights_file}: shape mismatch for module {n!r} (params {leaf_path!r} {shape}, layout {layout}): "
                f"expected lora_A (r, {n_in}) and lora_B ({n_out}, r), found {tuple(a.shape)} and {tuple(b.shape)}")
        if fixed_scale is None:   # LoRA / DoRA: r and alpha from the config's patterns
            r_cfg = int(_pattern_value(rank_pattern, n, r_default))
            if r_cfg != r:
                raise PeftFormatError(f"{weights_file}: module {n!r} has rank {r} in the weights but the config says "
                                      f"r={r_cfg} (r / rank_pattern)")
            alpha = _pattern_value(alpha_pattern, n, alpha_default)
        factors.append((a.T, b.T))
        ranks.append(r)
        scales.append(_peft_scale(alpha, r, rslora) if fixed_scale is None else fixed_scale)

    rank, scale = max(ranks), scales[0]
    a_list, b_list = [], []
    for (a, b), r, s in zip(factors, ranks, scales):
        if r < rank:  # zero-pad: the same product, one rank for the stack
            a = np.concatenate([a, np.zeros((a.shape[0], rank - r), a.dtype)], axis=1)
            b = np.concatenate([b, np.zeros((rank - r, b.shape[1]), b.dtype)], axis=0)
        if s != scale:
            b = (b.astype(np.float32) * (s / scale)).astype(b.dtype)
        a_list.append(a.reshape(inputs + (rank,)))
        b_list.append(b.reshape((rank,) + outputs))
    a = np.stack(a_list) if stacked else a_list[0]
    b = np.stack(b_list) if stacked else b_list[0]
    a, b = jnp.asarray(a), jnp.asarray(b)
    meta = AdapterMeta(method="dora" if use_dora else "lora", rank=int(rank), scale=float(scale), dropout=dropout,
                       init="peft")
    extra, cache = {}, {}
    if use_dora:
        mags = []
        for n in names:
            m = lora[n]["M"]
            if m.shape != (n_out,):
                raise PeftFormatError(f"{weights_file}: shape mismatch for module {n!r} (params {leaf_path!r} {shape}, "
                                      f"layout {layout}): expected lora_magnitude_vector ({n_out},), found {tuple(m.shape)}")
            mags.append(m.reshape(outputs))
        m = jnp.asarray(np.stack(mags) if stacked else mags[0])
        base = leaf.base if isinstance(leaf, AdaptedWeight) else leaf
        extra = {adapter: {"m": m}}
        cache = {adapter: {"w0_sq": column_sq_norms(dense(base, jnp.float32), layout)}}
    return _attach(leaf, leaf_path, layout, adapter, meta, {adapter: a}, {adapter: b}, extra, cache)


def _build_adalora_node(leaf_path, leaf, shape, layout, stacked, names, lora, adapter, config, dropout, weights_file):
    """An AdaLoRA node (method "adalora", ``extra["e"]`` = ``lora_E``) from PEFT's per-module
    triplets; scale ``lora_alpha / (init_r + 1e-5)`` as PEFT's ``ranknum``. Layers of a stacked
    kernel with fewer kept triplets are padded with zero singular values."""
    init_r = config.get("init_r", 12)
    if not isinstance(init_r, int) or init_r < 1:
        raise PeftFormatError(f"{weights_file}: AdaLoRA init_r must be a positive int, got {init_r!r}")
    pattern = config.get("rank_pattern") or {}
    for n in names:
        e, k = lora[n]["E"], lora[n]["A"].shape[0]
        if e.shape != (k, 1):
            raise PeftFormatError(f"{weights_file}: module {n!r}: lora_E has shape {tuple(e.shape)}, expected ({k}, 1) "
                                  f"(one singular value per lora_A row)")
        mask = pattern.get(f"{n}.lora_E")
        if mask is not None and (len(mask) != init_r or sum(bool(v) for v in mask) != k):
            raise PeftFormatError(f"{weights_file}: module {n!r}: rank_pattern keeps {sum(bool(v) for v in mask)} of "
                                  f"{len(mask)} triplets, but the file holds {k} (init_r={init_r})")
        if k > init_r:
            raise PeftFormatError(f"{weights_file}: module {n!r} has {k} triplets > init_r={init_r}")
    rank = max(lora[n]["A"].shape[0] for n in names)
    alpha = config.get("lora_alpha", 8)
    scale = (alpha if alpha > 0 else init_r) / (init_r + 1e-5)
    # lora_B's columns carry nothing AdaLoRA-specific: the LoRA builder pads and reshapes A and B
    padded = {}
    for n in names:
        a, b, e = lora[n]["A"], lora[n]["B"], lora[n]["E"][:, 0]
        k = a.shape[0]
        padded[n] = {"A": a, "B": b, "E": np.concatenate([e, np.zeros(rank - k, e.dtype)])}
    node = _build_node(leaf_path, leaf, shape, layout, stacked, names, padded, adapter, None, None, False,
                       {}, {}, dropout, weights_file, fixed_scale=float(scale))
    e = np.stack([padded[n]["E"] for n in names]) if stacked else padded[names[0]]["E"]
    meta = dataclasses.replace(node.meta[adapter], method="adalora")
    lora = node.states[adapter]
    return node.with_(states={**node.states, adapter: SVDState(a=lora.a, e=jnp.asarray(e), b=lora.b)},
                      adapters=tuple((k, meta if k == adapter else m) for k, m in node.adapters))


def _attach(leaf, leaf_path, layout, adapter, meta, a, b, extra, cache):
    """``leaf`` (a plain kernel or an AdaptedWeight) with the adapter ``adapter`` added."""
    base = leaf.base if isinstance(leaf, AdaptedWeight) else leaf
    new = AdaptedWeight.from_parts(base, layout, ((adapter, meta),), (adapter,), leaf_path,
                                   a=a, b=b, extra=extra, cache=cache)
    if isinstance(leaf, AdaptedWeight):
        if adapter in leaf.names:
            raise PeftFormatError(f"{leaf_path!r} already has an adapter named {adapter!r}; pass another adapter=")
        return leaf.add_adapter(adapter, new.states[adapter], meta)
    return new


def _build_ia3_node(leaf_path, leaf, shape, layout, stacked, names, lora, adapter, feedforward_modules, weights_file):
    rest = shape[1:] if stacked else shape
    ff = {n: _ia3_feedforward_match(feedforward_modules, n) for n in names}
    if len(set(ff.values())) > 1:
        raise PeftFormatError(f"{weights_file}: feedforward_modules {feedforward_modules!r} marks some layers of "
                              f"{leaf_path!r} as feed-forward and others not ({names[0]!r}: {ff[names[0]]})")
    feedforward = ff[names[0]]
    first = lora[names[0]]["L"]
    want = "(1, in)" if feedforward else "(out, 1)"
    if first.ndim != 2 or first.shape[0 if feedforward else 1] != 1:
        raise PeftFormatError(f"{weights_file}: module {names[0]!r} is {'' if feedforward else 'not '}in "
                              f"feedforward_modules, so ia3_l should be {want}; found {tuple(first.shape)}"
                              f"{' (convolution IA3 is not supported)' if first.ndim > 2 else ''}")
    if layout is None:
        n = first.size
        fits = [k for k in range(1, len(rest))
                if (math.prod(rest[:k]) if feedforward else math.prod(rest[k:])) == n]
        if len(fits) != 1:
            raise PeftFormatError(
                f"{weights_file}: module {names[0]!r}: ia3_l {tuple(first.shape)} "
                f"{'fits no' if not fits else 'fits more than one'} split of {leaf_path!r} {rest} into inputs x "
                f"outputs" + ("" if not fits else "; pass model=fn, example=args to load_peft"))
        layout = Layout(1 if stacked else 0, fits[0], len(rest) - fits[0])
    _, inputs, outputs = layout.split(shape)
    n_in, n_out = math.prod(inputs), math.prod(outputs)
    expected = (1, n_in) if feedforward else (n_out, 1)
    scales = []
    for n in names:
        l = lora[n]["L"]
        if tuple(l.shape) != expected:
            raise PeftFormatError(f"{weights_file}: shape mismatch for module {n!r} (params {leaf_path!r} {shape}, "
                                  f"layout {layout}, {'feed-forward' if feedforward else 'not feed-forward'}): expected "
                                  f"ia3_l {expected}, found {tuple(l.shape)}")
        scales.append(l.reshape(inputs if feedforward else outputs))
    l = jnp.asarray(np.stack(scales) if stacked else scales[0])
    meta = AdapterMeta(method="ia3", rank=0, scale=1.0, dropout=0.0, init="peft", feedforward=bool(feedforward))
    return _attach(leaf, leaf_path, layout, adapter, meta, {}, {}, {adapter: {"l": l}}, {})
