"""Hugging Face PEFT prompt-learning files (prompt tuning, prefix tuning, P-tuning) <-> jlora prompts.

PEFT saves a prompt-learning adapter as the *final* virtual-token table, whatever produced it
(``get_prompt_embedding_to_save``): ``adapter_model.safetensors`` holds

    prompt_embeddings                    (P, token_dim)              PROMPT_TUNING, P_TUNING
                                         (P, 2 * L * token_dim)      PREFIX_TUNING (keys, values per layer)
    base_model.<module>.weight / .bias   modules_to_save (a classification head; PyTorch layout)

and loads it with ``inference_mode`` (the default of ``PeftModel.from_pretrained``) straight into
the prompt encoder's embedding, bypassing any MLP / LSTM. jlora's prompt entries map onto that
byte for byte: a prompt-tuning embedding ``(P, d)`` is ``prompt_embeddings``; a prefix
``(P, L, 2, kv_heads, head_dim)`` is it reshaped row-major (``token_dim = kv_heads * head_dim``,
``num_attention_heads = kv_heads``, as PEFT sets them for grouped-query attention). jlora's Li &
Liang projection and P-tuning encoder are applied first (:func:`jlora.export_prompt`), so a
P-tuning prompt is written as a ``PROMPT_TUNING`` file (identical forward in PEFT) and a projected
prefix as a plain ``PREFIX_TUNING`` one. Reading a PEFT ``P_TUNING`` file gives a jlora
prompt-tuning prompt for the same reason.

Only decoder-only / encoder-only models (``num_transformer_submodules`` 1); encoder-decoder
prompts (2) are refused. Used by :func:`jlora.io.save_peft` / :func:`jlora.io.load_peft` when the
tree carries a prompt or the file is a prompt-learning one; ``files`` is io's PEFT file toolkit
(:mod:`jlora.io._peft_files`), which they pass in.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jlora.core.nodes import AdaptedWeight, Trainable, is_adapter_leaf
from jlora.core.paths import flatten_with_paths
from jlora.core.errors import PeftFormatError
from jlora.methods._peft import register_tree_codec
from jlora.methods.prompt import PROMPT_KEY, _with_entry, _wrap, export_prompt, prompt_params

PREFIX = "base_model."          # prompt-learning PeftModels wrap the transformers model directly
PROMPT_TYPES = ("PROMPT_TUNING", "PREFIX_TUNING", "P_TUNING")
EMBEDDINGS = "prompt_embeddings"
#: PEFT task types whose PeftModel subclass injects a prompt (decoder-only / encoder-only models)
TASK_TYPES = ("SEQ_CLS", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")


def save_peft_prompt(path, adapted, naming, files, *, base_model_name_or_path=None, revision=None, task_type=None,
                     overwrite=False):
    """Writes the prompt of ``adapted`` (and its ``Trainable`` head as ``modules_to_save``) as a
    PEFT prompt-learning adapter directory. Returns the path. ``base_model_name_or_path`` and
    ``revision`` go to ``adapter_config.json`` as in :func:`jlora.io.save_peft`."""

    provenance = files._provenance(base_model_name_or_path, revision)

    if not callable(naming):
        raise TypeError(f"naming must be a function (path, layer) -> module name, got {naming!r}")
    if task_type not in TASK_TYPES:
        raise ValueError(f"save_peft: a prompt-learning file needs task_type= one of {TASK_TYPES} (PEFT injects the "
                         f"prompt only in its task models), got {task_type!r}")
    tree = export_prompt(adapted)
    entry = prompt_params(tree)
    if entry is None:
        raise ValueError(f"save_peft_prompt: the tree carries no prompt ({PROMPT_KEY!r})")
    (kind, p), = entry.items()
    emb = np.asarray(p["embedding"].value if isinstance(p["embedding"], Trainable) else p["embedding"])
    rest = {k: v for k, v in tree.items() if k != PROMPT_KEY}
    flat, _ = flatten_with_paths(rest, is_leaf=is_adapter_leaf)
    nodes = [q for q, leaf in flat if isinstance(leaf, AdaptedWeight)]
    if nodes:
        raise ValueError(f"save_peft: a PEFT adapter file holds one method; this tree has a prompt and weight "
                         f"adapters on {nodes[:3]}. Save them as two adapters")
    if kind == "prompt_tuning":
        if emb.ndim != 2:
            raise ValueError(f"prompt embedding must be (num_virtual_tokens, dim), got {emb.shape}")
        n_virtual, token_dim = emb.shape
        config = {"peft_type": "PROMPT_TUNING", "prompt_tuning_init": "RANDOM", "prompt_tuning_init_text": None,
                  "tokenizer_name_or_path": None, "tokenizer_kwargs": None,
                  "num_layers": None, "num_attention_heads": None}
    elif kind == "prefix_tuning":
        if emb.ndim != 5 or emb.shape[2] != 2:
            raise ValueError(f"prefix must be (num_virtual_tokens, layers, 2, kv_heads, head_dim), got {emb.shape}")
        n_virtual, n_layers, _, heads, head_dim = emb.shape
        token_dim = heads * head_dim
        emb = emb.reshape(n_virtual, n_layers * 2 * token_dim)
        config = {"peft_type": "PREFIX_TUNING", "encoder_hidden_size": token_dim, "prefix_projection": False,
                  "init_weights": None, "num_layers": int(n_layers), "num_attention_heads": int(heads)}
    else:
        raise ValueError(f"save_peft: cannot write the prompt kind {kind!r}")
    tensors = {EMBEDDINGS: np.ascontiguousarray(emb)}
    save_modules = files._modules_to_save_tensors(flat, naming, tensors, PREFIX)
    config.update({"auto_mapping": None, **provenance, "inference_mode": True,
                   "modules_to_save": sorted(set(save_modules)) or None, "num_transformer_submodules": 1,
                   "num_virtual_tokens": int(n_virtual), "task_type": task_type, "token_dim": int(token_dim)})
    return files._write_adapter_dir(path, overwrite, tensors, config)


def load_peft_prompt(path, params, naming, config: dict, files):
    """``params`` with the prompt of the PEFT prompt-learning adapter at ``path`` (whose checked
    ``config`` is given) and its ``modules_to_save`` as ``Trainable`` leaves."""

    if not isinstance(params, Mapping):
        raise TypeError(f"load_peft: a prompt adapter needs a params mapping to hold {PROMPT_KEY!r}, "
                        f"got {type(params).__name__}")
    if PROMPT_KEY in params:
        raise ValueError(f"params already carry a prompt ({PROMPT_KEY!r}); pass the model's params without it")
    path = os.path.abspath(os.fspath(path))
    weights_file = os.path.join(path, files.WEIGHTS_NAME)
    if not os.path.isfile(weights_file):
        raise FileNotFoundError(f"no PEFT adapter weights at {weights_file}")
    metadata: dict = {}
    raw = files._read_safetensors(weights_file, metadata)
    files._verify_integrity(weights_file, raw, metadata, config)
    peft_type = str(config["peft_type"]).upper()
    subs = config.get("num_transformer_submodules") or 1
    if subs != 1:
        raise PeftFormatError(f"{path}: num_transformer_submodules={subs} (an encoder-decoder prompt); jlora "
                                    f"reads decoder-only / encoder-only prompts (1)")
    if EMBEDDINGS not in raw:
        raise PeftFormatError(f"{weights_file}: no {EMBEDDINGS!r} tensor (found {sorted(raw)[:4]})")
    emb = raw.pop(EMBEDDINGS)
    n_virtual, token_dim = config.get("num_virtual_tokens"), config.get("token_dim")
    if emb.ndim != 2 or (n_virtual is not None and emb.shape[0] != n_virtual):
        raise PeftFormatError(f"{weights_file}: {EMBEDDINGS} has shape {emb.shape}, expected "
                                    f"(num_virtual_tokens={n_virtual}, ...)")
    if peft_type == "PREFIX_TUNING":
        layers, heads = config.get("num_layers"), config.get("num_attention_heads")
        if not all(isinstance(v, int) and v > 0 for v in (layers, heads, token_dim)) or token_dim % heads \
                or emb.shape[1] != 2 * layers * token_dim:
            raise PeftFormatError(
                f"{weights_file}: {EMBEDDINGS} {emb.shape} does not fit num_layers={layers}, num_attention_heads="
                f"{heads}, token_dim={token_dim} (expected (P, 2 * num_layers * token_dim))")
        entry = {"prefix_tuning": {"embedding": emb.reshape(emb.shape[0], layers, 2, heads, token_dim // heads)}}
    else:                                   # PROMPT_TUNING and P_TUNING: the saved table is the final prompt
        if token_dim is not None and emb.shape[1] != token_dim:
            raise PeftFormatError(f"{weights_file}: {EMBEDDINGS} {emb.shape} does not fit token_dim={token_dim}")
        entry = {"prompt_tuning": {"embedding": emb}}
    extra = {}
    for key, value in raw.items():
        if not key.startswith(PREFIX):
            raise PeftFormatError(f"{weights_file}: unexpected tensor {key!r} in a {peft_type} adapter")
        extra[key[len(PREFIX):]] = value
    flat, treedef = flatten_with_paths(params, is_leaf=is_adapter_leaf)
    placements = {}
    files._place_modules_to_save(flat, naming, extra, placements, weights_file, PREFIX)
    leaves = [placements.get(i, leaf) for i, (_, leaf) in enumerate(flat)]
    out = jax.tree_util.tree_unflatten(treedef, leaves)
    return _with_entry(out, _wrap(jax.tree_util.tree_map(jnp.asarray, entry), PROMPT_KEY))


register_tree_codec(PROMPT_KEY, PROMPT_TYPES, save_peft_prompt, load_peft_prompt)
