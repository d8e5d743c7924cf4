"""Merged weights as a Hugging Face model directory (``jlora export --format hf``).

:func:`hf_tensors` turns plain (merged) params of a jlora BERT or Llama-family model into
HF-named tensors in PyTorch layout; :func:`save_hf_directory` writes them as ``config.json`` +
``model.safetensors`` (or shards of at most ``max_shard_bytes`` with ``model.safetensors.index.json``,
as ``save_pretrained`` does) + the tokenizer files, atomically. ``transformers`` loads the result
with ``from_pretrained`` and serving engines read it like any checkpoint.

Example::

    merged = jlora.merge(adapted)
    tensors = hf_tensors(merged, "llama", model.config)
    save_hf_directory("out/hf", tensors, config_json, tokenizer_files={"tokenizer.json": src / "tokenizer.json"})
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile
from collections.abc import Mapping

import jax
import numpy as np
from safetensors.numpy import save_file

from jlora.core.paths import flatten_with_paths
from jlora.io.checkpoint import check_finite
from jlora.models import bert, llama, vit

#: safetensors dtype names as config.json's ``torch_dtype`` spells them
_TORCH_DTYPE = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def hf_tensors(params, family: str, config, *, dtype=None) -> dict[str, np.ndarray]:
    """``{hf_name: array}`` (PyTorch ``(out, in)`` layout) for plain ``params`` of a jlora model.

    ``family`` is ``"llama"`` (``LlamaForCausalLM`` names; a tied head writes no ``lm_head``) or
    ``"bert"`` / ``"vit"`` (``BertForSequenceClassification`` / ``ViTForImageClassification`` names
    under ``bert.`` / ``vit.`` plus ``classifier.*``, or the bare encoder without a classifier). Scanned (stacked) layers are unstacked. ``dtype``
    casts every floating tensor. Raises ValueError for an unknown family or a leaf with no HF name.
    """
    root = params.get("params", params) if isinstance(params, Mapping) else params
    host = jax.tree_util.tree_map(np.asarray, jax.device_get({"params": dict(root)}))
    out = {}
    if family == "llama":
        if "layers" in host["params"].get("model", {}):
            host = jax.tree_util.tree_map(np.asarray, llama.unstack_layers(host))
        for path, leaf in flatten_with_paths(host)[0]:
            name = llama.hf_param_name(path)
            out[name] = leaf.T if path.endswith("/kernel") else leaf
    elif family in ("bert", "vit"):
        module = bert if family == "bert" else vit
        if "layer" in host["params"].get("encoder", {}) or "layers" in host["params"].get("encoder", {}):
            host = jax.tree_util.tree_map(np.asarray, module.unstack_layers(host))
        inner = host["params"]
        with_classifier = "classifier" in inner
        prefix = f"{family}." if with_classifier else ""
        plain = config.replace(scan_layers=False) if hasattr(config, "replace") else config
        for hf, path, shape, how in module._expected_tensors(plain, with_classifier):
            node = inner
            for part in path:
                if part not in node:
                    raise ValueError(f"hf_tensors: params have no {'/'.join(path)} (for {hf})")
                node = node[part]
            if how is True:
                value = node.T
            elif how:   # the loader applied np.transpose(hf, how): undo it
                value = np.transpose(node, np.argsort(how))
            else:
                value = node
            if tuple(value.shape) != tuple(shape):
                raise ValueError(f"hf_tensors: {'/'.join(path)} has shape {value.shape}, {hf} needs {shape}")
            out[(hf if hf.startswith("classifier") else prefix + hf)] = value
    else:
        raise ValueError(f"hf_tensors: family must be 'llama', 'bert' or 'vit', got {family!r}")
    for name, value in out.items():
        value = np.ascontiguousarray(value)
        if dtype is not None and jax.numpy.issubdtype(value.dtype, jax.numpy.floating):
            value = value.astype(jax.numpy.dtype(dtype))
        out[name] = value
    return out


def llama_config_json(config, model_type: str = "llama") -> dict:
    """An HF ``config.json`` for a jlora :class:`~jlora.models.llama.LlamaConfig` (used when the model
    came from a GGUF file and there is no original config.json to copy)."""
    arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}[model_type]
    out = {"architectures": [arch], "model_type": model_type, "hidden_act": "silu"}
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "max_position_embeddings",
                "tie_word_embeddings", "attention_bias", "mlp_bias", "initializer_range", "bos_token_id",
                "eos_token_id", "pad_token_id"):
        value = getattr(config, key, None)
        if isinstance(value, tuple):
            value = list(value)
        if value is not None:
            out[key] = value
    if model_type == "qwen2":
        out.pop("attention_bias", None)   # Qwen2 always has q/k/v biases
        out.pop("mlp_bias", None)
    if config.sliding_window is not None:
        out["sliding_window"] = config.sliding_window
    out.setdefault("num_key_value_heads", config.num_attention_heads)
    out["head_dim"] = config.hidden_size // config.num_attention_heads if config.head_dim is None else config.head_dim
    return out


def save_hf_directory(path, tensors: Mapping[str, np.ndarray], config_json: Mapping, *,
                      files: Mapping[str, object] | None = None, max_shard_bytes: int = 5 * 1024 ** 3,
                      overwrite: bool = False) -> str:
    """Writes ``config.json``, the tensors as ``model.safetensors`` (or ``model-0000i-of-0000n.safetensors``
    shards of at most ``max_shard_bytes`` plus ``model.safetensors.index.json``) and ``files``
    (``{name: pathlib.Path to copy, or str contents}``, e.g. the tokenizer files) into a new directory, atomically
    (a temporary sibling renamed into place). Refuses non-finite tensors (:class:`jlora.io.NonFiniteError`)
    and an existing ``path`` unless ``overwrite``. ``config_json["torch_dtype"]`` is set from the tensors."""

    if not isinstance(max_shard_bytes, int) or max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes must be a positive int, got {max_shard_bytes!r}")
    if not tensors:
        raise ValueError("save_hf_directory: no tensors to write")
    check_finite(dict(tensors), f"save_hf_directory {path}")
    path = pathlib.Path(os.path.abspath(os.fspath(path)))
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        shards, current, size = [], {}, 0
        for name in sorted(tensors):
            n = int(tensors[name].nbytes)
            if current and size + n > max_shard_bytes:
                shards.append(current)
                current, size = {}, 0
            current[name] = tensors[name]
            size += n
        shards.append(current)
        floats = {str(v.dtype) for v in tensors.values() if str(v.dtype) in _TORCH_DTYPE}
        config = dict(config_json)
        if len(floats) == 1:   # transformers 5 reads "dtype", older versions "torch_dtype"
            config["torch_dtype"] = config["dtype"] = _TORCH_DTYPE[floats.pop()]
        if len(shards) == 1:
            save_file(shards[0], str(tmp / "model.safetensors"), metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards, 1):
                fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / fname), metadata={"format": "pt"})
                weight_map.update({k: fname for k in shard})
            index = {"metadata": {"total_size": int(sum(int(v.nbytes) for v in tensors.values()))},
                     "weight_map": dict(sorted(weight_map.items()))}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for name, source in (files or {}).items():
            if isinstance(source, pathlib.Path):
                shutil.copy(source, tmp / name)
            else:
                (tmp / name).write_text(str(source))
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return str(path)
