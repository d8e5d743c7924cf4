"""Helpers shared by the reference models' Hugging Face code (private; BERT, ViT, Llama).

:mod:`jlora.models.bert` and :mod:`jlora.models.vit` read a single ``model.safetensors`` the
same way: normalise the tensor names, check every expected tensor's presence and shape,
re-lay out and cast what fits, then report what the model did not use; they also validate
their configs and read ``config.json`` alike. :mod:`jlora.models.llama` shares the dtype check,
path parsing and the flat <-> nested tree helpers. Both use the host-side input checks behind
their ``check_inputs`` (token ids in range, 0/1 masks). The model modules keep their own names,
layouts and error messages (passed in here where they differ); what is here is only what was
the same.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import warnings
from typing import Any, Callable, Iterable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file

#: ``layer_<i>``: one encoder layer in the per-layer layout (BERT, ViT).
LAYER_KEY = re.compile(r"layer_(\d+)")

_DTYPE_MESSAGE = "{owner}.{name} must be a dtype (e.g. jnp.float32, 'bfloat16'), got {value!r}"


# ---------------------------------------------------------------------------------------------
# config

def canonical_dtype(value, name: str, owner: str, *, error: type[Exception] = TypeError,
                    message: str = _DTYPE_MESSAGE):
    """``jnp.dtype(value)``; a value that is not a dtype raises ``error(message)``, the message
    formatted with ``owner`` (the config class name), ``name`` (the field) and ``value``."""
    try:
        return jnp.dtype(value)
    except TypeError:
        raise error(message.format(owner=owner, name=name, value=value)) from None


def check_positive_ints(cfg, owner: str, names: Iterable[str]) -> None:
    """Each field in ``names`` must be a positive int (not a bool); numpy ints become ``int``."""
    for f in names:
        v = getattr(cfg, f)
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{owner}.{f} must be a positive int, got {v!r}")
        object.__setattr__(cfg, f, int(v))


def check_encoder_shape(cfg, owner: str, activations: Mapping) -> None:
    """The encoder checks BERT and ViT configs share: ``num_attention_heads`` divides
    ``hidden_size``, ``hidden_act`` is a key of ``activations``, ``layer_norm_eps`` > 0."""
    if cfg.hidden_size % cfg.num_attention_heads:
        raise ValueError(f"{owner}.hidden_size ({cfg.hidden_size}) must be divisible by "
                         f"num_attention_heads ({cfg.num_attention_heads})")
    if cfg.hidden_act not in activations:
        raise ValueError(f"{owner}.hidden_act {cfg.hidden_act!r} is not supported; use one of {sorted(activations)}")
    if isinstance(cfg.layer_norm_eps, bool) or not isinstance(cfg.layer_norm_eps, (int, float)) \
            or not cfg.layer_norm_eps > 0:
        raise ValueError(f"{owner}.layer_norm_eps must be a positive number, got {cfg.layer_norm_eps!r}")


def check_probabilities(cfg, owner: str, names: Iterable[str], optional: Iterable[str] = ()) -> None:
    """Each field in ``names`` must be a number in [0, 1) (those in ``optional`` may be None)."""
    for f in names:
        v = getattr(cfg, f)
        if v is None and f in optional:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v < 1.0:
            raise ValueError(f"{owner}.{f} must be a probability in [0, 1), got {v!r}")


def check_bools_and_dtypes(cfg, owner: str, bools: Iterable[str]) -> None:
    """Each field in ``bools`` must be a bool; ``dtype`` / ``param_dtype`` become ``jnp.dtype`` objects."""
    for f in bools:
        if not isinstance(getattr(cfg, f), bool):
            raise ValueError(f"{owner}.{f} must be a bool, got {getattr(cfg, f)!r}")
    object.__setattr__(cfg, "dtype", canonical_dtype(cfg.dtype, "dtype", owner))
    object.__setattr__(cfg, "param_dtype", canonical_dtype(cfg.param_dtype, "param_dtype", owner))


#: ``remat`` settings by name (what a rematerialised layer keeps from its forward pass; JAX's
#: ``jax.checkpoint_policies``): ``True`` is ``"nothing_saveable"`` (only the layer's input, every
#: intermediate recomputed); ``"dots_with_no_batch_dims_saveable"`` keeps the weight matmuls' outputs;
#: ``"dots_saveable"`` every matmul's (attention scores too); ``"offload_dots_with_no_batch_dims"``
#: keeps the former in pinned host memory instead of the device's.
REMAT_POLICIES = ("nothing_saveable", "dots_with_no_batch_dims_saveable", "dots_saveable",
                  "offload_dots_with_no_batch_dims")


def check_remat(cfg, owner: str) -> None:
    """``cfg.remat`` must be a bool or a name in :data:`REMAT_POLICIES`."""
    value = cfg.remat
    if isinstance(value, (bool, np.bool_)):
        object.__setattr__(cfg, "remat", bool(value))
    elif value not in REMAT_POLICIES:
        raise ValueError(f"{owner}.remat must be True, False or a policy in {REMAT_POLICIES}, got {value!r}")


def remat_policy(remat):
    """The ``jax.checkpoint`` policy for a ``remat`` setting (None: JAX's default, nothing saved)."""
    if remat is True or remat == "nothing_saveable":
        return None
    if remat == "offload_dots_with_no_batch_dims":
        return jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host")
    return getattr(jax.checkpoint_policies, remat)


def remat_layer(layer_cls, remat, scan_layers: bool):
    """``layer_cls`` wrapped in ``nn.remat`` with the policy ``remat`` names (itself when False)."""
    if not remat:
        return layer_cls
    return nn.remat(layer_cls, prevent_cse=not scan_layers, policy=remat_policy(remat))


def read_config(config, owner: str, what: str) -> Mapping:
    """A ``config.json`` as a mapping: ``config`` may be a mapping, the file, the directory
    holding it, or an object with ``to_dict()`` (a ``transformers`` config)."""
    if isinstance(config, (str, os.PathLike)):
        p = pathlib.Path(config)
        if p.is_dir():
            p = p / "config.json"
        if not p.is_file():
            raise FileNotFoundError(f"no {what} config at {p}")
        with open(p) as f:
            config = json.load(f)
    elif hasattr(config, "to_dict") and not isinstance(config, Mapping):
        config = config.to_dict()
    if not isinstance(config, Mapping):
        raise TypeError(f"{owner}.from_hf expects a dict or a path to config.json, got {type(config).__name__}")
    return config


def config_fields(cls, overrides: Mapping) -> set[str]:
    """The dataclass field names of ``cls``; raises ``TypeError`` for overrides that are not one."""
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise TypeError(f"unknown {cls.__name__} override(s) {unknown}; valid fields: {sorted(fields)}")
    return fields


def config_kwargs(config: Mapping, fields: set[str], overrides: Mapping) -> dict:
    """Constructor arguments from an HF config: its keys that are fields (not the jlora-only
    ``scan_layers`` / ``remat`` / ``dtype`` / ``param_dtype``), ``num_labels`` from ``id2label``
    when only that is given, then ``overrides``."""
    kwargs = {k: v for k, v in config.items() if k in fields and k not in ("scan_layers", "remat", "dtype", "param_dtype")}
    if "num_labels" not in config and isinstance(config.get("id2label"), Mapping) and config["id2label"]:
        kwargs["num_labels"] = len(config["id2label"])
    kwargs.update(overrides)
    return kwargs


# ---------------------------------------------------------------------------------------------
# parameter trees

def set_path(tree: dict, path: tuple, value) -> None:
    """``tree[path[0]][path[1]]... = value``, making the inner dicts on the way."""
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def flatten_tree(tree: Mapping, prefix: str = "") -> dict:
    """Nested mappings -> ``{"a/b/c": leaf}``."""
    out = {}
    for k, v in tree.items():
        p = f"{prefix}/{k}" if prefix else k
        if isinstance(v, Mapping):
            out.update(flatten_tree(v, p))
        else:
            out[p] = v
    return out


def unflatten_tree(flat: Mapping) -> dict:
    """Inverse of :func:`flatten_tree`."""
    root: dict = {}
    for path, v in flat.items():
        node = root
        *dirs, leaf = path.split("/")
        for d in dirs:
            node = node.setdefault(d, {})
        node[leaf] = v
    return root


def add_new_classifier(params: dict, cfg, seed: int) -> None:
    """Puts a new ``classifier`` head in ``params["params"]`` unless it has one: kernel
    ~ N(0, ``cfg.initializer_range``) from ``jax.random.key(seed)``, zero bias, ``cfg.param_dtype``."""
    if "classifier" not in params["params"]:
        kernel = cfg.initializer_range * jax.random.normal(jax.random.key(seed), (cfg.hidden_size, cfg.num_labels), jnp.float32)
        params["params"]["classifier"] = {"kernel": kernel.astype(cfg.param_dtype),
                                          "bias": jnp.zeros((cfg.num_labels,), cfg.param_dtype)}


# ---------------------------------------------------------------------------------------------
# names

def module_parts(path: str, leaves: Iterable[str]) -> list[str]:
    """The parts of a jlora parameter path without a leading ``params`` and a trailing leaf
    name in ``leaves`` (may be empty)."""
    parts = [p for p in path.strip("/").split("/") if p]
    if parts and parts[0] == "params":
        parts = parts[1:]
    if parts and parts[-1] in leaves:
        parts = parts[:-1]
    return parts


def encoder_layer_index(path: str, key: str, layer: int | None) -> int:
    """The layer index of an ``encoder/<key>/...`` path: ``key`` is ``layer_<i>`` (per-layer
    layout; ``layer``, when given, must agree) or ``layers`` (scanned layout; ``layer`` needed)."""
    m = LAYER_KEY.fullmatch(key)
    if m:
        if layer is not None and int(layer) != int(m.group(1)):
            raise ValueError(f"{path!r} is layer {m.group(1)} but layer={layer} was passed")
        idx = int(m.group(1))
    elif key == "layers":
        if layer is None:
            raise ValueError(f"{path!r} is a stacked (scan_layers) path; pass layer=<index>")
        idx = int(layer)
    else:
        raise ValueError(f"{path!r}: expected encoder/layer_<i>/... or encoder/layers/...")
    if idx < 0:
        raise ValueError(f"layer must be >= 0, got {idx}")
    return idx


# ---------------------------------------------------------------------------------------------
# safetensors checkpoints

def read_safetensors(source, normalise_name: Callable[[str], str],
                     duplicate_message: Callable[[pathlib.Path, str, str], str]):
    """Reads ``source`` (a safetensors file, or a directory holding ``model.safetensors`` or the
    shards a ``model.safetensors.index.json`` names) as numpy arrays keyed by ``normalise_name(name)``.

    Returns ``(tensors, original, path)``: ``original`` maps each key back to the name in the
    file. Two names that normalise to one key raise ``ValueError(duplicate_message(path,
    first_name, second_name))``.
    """


    p = pathlib.Path(source)
    files = [p]
    if p.is_dir():
        index = p / "model.safetensors.index.json"
        if index.is_file():
            files = [p / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
            p = index
        else:
            p = files[0] = p / "model.safetensors"
    for f in files:
        if not f.is_file():
            hint = ""
            if f.name == "model.safetensors" and (f.parent / "pytorch_model.bin").is_file():
                hint = " (pytorch_model.bin pickles are not read: save the model with safe_serialization=True)"
            raise FileNotFoundError(f"no safetensors checkpoint at {f}{hint}")
    raw = {}
    for f in files:
        raw.update(load_file(str(f)))
    tensors, original = {}, {}
    for name, value in raw.items():
        key = normalise_name(name)
        if key in tensors:
            raise ValueError(duplicate_message(p, original[key], name))
        tensors[key], original[key] = value, name
    return tensors, original, p


def relayout(value, how):
    """A checkpoint tensor in jlora's layout: ``how`` is None / False (as is), True (2-D
    transpose, a PyTorch ``Linear.weight`` -> Flax kernel) or an axis permutation."""
    if how is None or how is False:
        return value
    if how is True:
        return np.ascontiguousarray(value.T)
    return np.ascontiguousarray(np.transpose(value, how))


def collect_params(expected, tensors: Mapping, original: Mapping, param_dtype,
                   transform: Callable[[Any, Any], Any] = relayout):
    """Fills a nested parameter dict from ``expected``, ``[(key, jlora_path_tuple, shape, how)]``.

    Each tensor present with the expected shape is ``transform(value, how)``-ed and cast to
    ``param_dtype``. Returns ``(params, problems, used)``: ``problems`` names each missing or
    mis-shaped tensor, ``used`` holds the keys of the tensors that were looked at.
    """
    problems, params, used = [], {}, set()
    for hf, path, shape, how in expected:
        if hf not in tensors:
            problems.append(f"missing tensor {hf!r} (expected shape {shape})")
            continue
        value = tensors[hf]
        used.add(hf)
        if tuple(value.shape) != shape:
            problems.append(f"tensor {original[hf]!r} has shape {tuple(value.shape)}, expected {shape}")
            continue
        set_path(params, path, jnp.asarray(transform(value, how), dtype=param_dtype))
    return params, problems, used


def raise_problems(problems: list[str], path, config) -> None:
    """``ValueError`` listing the first 12 ``problems`` (and how many more), if there are any."""
    if problems:
        more = f" (and {len(problems) - 12} more)" if len(problems) > 12 else ""
        raise ValueError(f"{path} does not fit {config}:\n  " + "\n  ".join(problems[:12]) + more)


def report_unused(path, original: Mapping, used: set, model: str, *, strict: bool,
                  skip: Callable[[str], bool] | None = None, stacklevel: int = 3) -> None:
    """Warns (raises ``ValueError`` with ``strict``) about the tensors of ``original`` whose key
    is neither in ``used`` nor skipped. ``stacklevel`` counts from here: the default 3 points the
    warning at whoever called the function that calls this one."""
    unused = sorted(original[k] for k in original if k not in used and not (skip is not None and skip(k)))
    if unused:
        msg = f"{path}: {len(unused)} tensor(s) not used by the {model} model: {unused[:16]}"
        if strict:
            raise ValueError(msg)
        warnings.warn(msg, stacklevel=stacklevel)


# ---------------------------------------------------------------------------------------------
# host-side input checks (the models' check_inputs)

def host_array(value, name: str, owner: str) -> np.ndarray:
    """``value`` (a numpy / jax array or nested lists) as a numpy array on the host. A jax tracer
    raises ``TypeError`` (these checks read the values, so they run before ``jit``); ragged lists
    raise ``ValueError``."""
    if isinstance(value, jax.core.Tracer):
        raise TypeError(f"{owner}: {name} is a jax tracer ({type(value).__name__}); this is a host-side check on "
                        f"concrete arrays: call it before jax.jit / vmap / grad, on the batch you are about to "
                        f"pass in, not inside the traced function")
    try:
        return np.asarray(value)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        raise TypeError(f"{owner}: {name} holds jax tracers; this is a host-side check on concrete arrays: call "
                        f"it before jax.jit / vmap / grad, not inside the traced function") from None
    except ValueError as e:
        raise ValueError(f"{owner}: {name} is not a rectangular array (rows of different lengths? pad them): "
                         f"{e}") from None


def check_int_matrix(value, name: str, owner: str, shape: tuple | None = None) -> np.ndarray:
    """``value`` as a 2-D integer numpy array (``TypeError`` for another dtype, ``ValueError`` for
    another rank, or a shape other than ``shape`` when given)."""
    x = host_array(value, name, owner)
    if x.ndim != 2:
        raise ValueError(f"{owner}: {name} must be 2-D (batch, seq), got shape {x.shape}")
    if shape is not None and x.shape != tuple(shape):
        raise ValueError(f"{owner}: {name} has shape {x.shape}, input_ids {tuple(shape)}; they must be equal")
    if x.size and not np.issubdtype(x.dtype, np.integer):
        raise TypeError(f"{owner}: {name} must hold integers, got dtype {x.dtype}")
    return x


def check_ids_in_range(ids: np.ndarray, name: str, size: int, size_name: str, owner: str) -> None:
    """``ValueError`` naming the first id of the 2-D int array ``ids`` outside ``[0, size)``, its
    (row, column) and how many there are. Costs a min and a max when all are in range."""
    if not ids.size or (ids.min() >= 0 and ids.max() < size):
        return
    bad = (ids < 0) | (ids >= size)
    row, col = (int(i) for i in np.argwhere(bad)[0])
    n = int(bad.sum())
    more = f" ({n} out-of-range ids in all)" if n > 1 else ""
    raise ValueError(f"{owner}: {name}[{row}, {col}] = {int(ids[row, col])} is out of range: valid ids are "
                     f"[0, {size_name}) = [0, {size}){more}")


def check_attention_mask(mask, shape: tuple, owner: str) -> None:
    """``attention_mask`` must have ``shape`` and hold only 0 and 1 (bools, ints or floats);
    ``ValueError`` naming the first other value and its (row, column)."""
    m = host_array(mask, "attention_mask", owner)
    if m.shape != tuple(shape):
        raise ValueError(f"{owner}: attention_mask has shape {m.shape}, input_ids {tuple(shape)}; they must be equal")
    if m.dtype == bool or not m.size:
        return
    if not (np.issubdtype(m.dtype, np.integer) or np.issubdtype(m.dtype, np.floating)):
        raise TypeError(f"{owner}: attention_mask must hold 0/1 (bool, int or float), got dtype {m.dtype}")
    bad = (m != 0) & (m != 1)
    if bad.any():
        row, col = (int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"{owner}: attention_mask[{row}, {col}] = {m[row, col].item()!r} is not 0 or 1; the "
                         f"mask holds 1 for tokens and 0 for padding")
