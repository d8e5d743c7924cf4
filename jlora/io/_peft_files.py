"""What every PEFT file codec shares: module naming, the safetensors reader / writer, jlora's
integrity record, ``modules_to_save`` in PyTorch layout and the atomic adapter-directory write.
Used by :mod:`jlora.io.peft`, which hands this module to the whole-tree forms (prompt learning:
:mod:`jlora.methods.prompt_peft`) as their ``files``."""

from __future__ import annotations

import collections
import difflib
import json
import math
import os
import re
import struct
import sys
from typing import Callable

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from jlora.core.errors import PeftFormatError
from jlora.core.nodes import AdaptedWeight, Trainable
from jlora.io.checkpoint import _atomic_write, _digests, check_finite

CONFIG_NAME = "adapter_config.json"


WEIGHTS_NAME = "adapter_model.safetensors"


PREFIX = "base_model.model."





Naming = Callable[[str, "int | None"], str]


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


def _st_dtypes():

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

    return {"jlora_sha256": json.dumps(_digests({k: np.ascontiguousarray(v) for k, v in tensors.items()}),
                                       sort_keys=True),
            "jlora_config": _config_record(config)}


def _verify_integrity(weights_file: str, raw: dict, metadata: dict, config: dict) -> None:
    """Checks a file jlora wrote against its own record (files from PEFT have none: nothing to check)."""

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


def _target_match(target_modules, module: str) -> bool:
    """PEFT's ``check_target_module_exists`` for a str (fullmatch) or a list (name or ``.name``
    suffix), without exclusions."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, module) is not None
    return module in target_modules or any(module.endswith("." + t) for t in target_modules)


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
