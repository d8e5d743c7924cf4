"""Vision Transformer (ViT) image classifier (Flax Linen) that loads Hugging Face ViT checkpoints.

**No pretrained ViT ships in any package reachable here** (PyPI, Debian, npm), so this module is
tested only for parity with ``transformers.ViTForImageClassification`` on small *random*
configurations. Real checkpoints
(e.g. ``google/vit-base-patch16-224``) load from any Hugging Face ViT directory
(``config.json`` + ``model.safetensors``) with :func:`load_pretrained` / :func:`load_hf_params`.

Inputs are **NHWC** float images ``(batch, height, width, channels)``, already normalised the
way the checkpoint expects (e.g. ``(x / 255 - 0.5) / 0.5`` for the Google ViTs). Hugging Face
takes NCHW ``pixel_values``: ``images = pixel_values.transpose(0, 2, 3, 1)``.

Parameter names mirror the Hugging Face *checkpoint* names (the tensor names in
``model.safetensors`` files on the Hub, which ``save_pretrained`` still writes), with plain 2-D
``nn.Dense`` kernels in Flax's ``(in, out)`` order and the patch projection as an ``nn.Conv``
with an HWIO kernel (PyTorch's Conv2d weight is OIHW)::

    params/embeddings/cls_token                                   embeddings.cls_token (1, 1, H)
    params/embeddings/position_embeddings                         embeddings.position_embeddings (1, 1+N, H)
    params/embeddings/patch_embeddings/projection/kernel          embeddings.patch_embeddings.projection.weight (OIHW -> HWIO)
    params/encoder/layer_3/layernorm_before/scale                 encoder.layer.3.layernorm_before.weight
    params/encoder/layer_3/attention/attention/query/kernel       encoder.layer.3.attention.attention.query.weight (T)
    params/encoder/layer_3/attention/output/dense/kernel          encoder.layer.3.attention.output.dense.weight (T)
    params/encoder/layer_3/layernorm_after/scale                  encoder.layer.3.layernorm_after.weight
    params/encoder/layer_3/intermediate/dense/kernel              encoder.layer.3.intermediate.dense.weight (T)
    params/encoder/layer_3/output/dense/kernel                    encoder.layer.3.output.dense.weight (T)
    params/layernorm/scale                                        layernorm.weight
    params/classifier/kernel                                      classifier.weight (T)

transformers >= 5 renamed the *in-memory* modules (``layers.3.attention.q_proj``,
``attention.o_proj``, ``mlp.fc1``, ``mlp.fc2``) and converts on load/save; :func:`load_hf_params`
reads either naming (with or without the ``vit.`` prefix), and :func:`hf_module_name` gives either
(``naming="checkpoint"`` or ``"transformers5"``).

:class:`ViTForImageClassification` keeps ``embeddings`` / ``encoder`` / ``layernorm`` at the top of
its tree (no ``vit`` scope), so one parameter tree serves both models. ``ViTConfig(scan_layers=True)``
runs the encoder as one ``nn.scan`` with every layer parameter stacked on axis 0 under
``params/encoder/layers/...``; :func:`stack_layers` / :func:`unstack_layers` convert.

Example::

    from jlora.models import vit
    model, params = vit.load_pretrained("path/to/vit-base-patch16-224", num_labels=10)
    logits = model.apply(params, images)                      # images: (B, 224, 224, 3) NHWC

LoRA on it (the classification head is trained in full, not adapted)::

    spec = jlora.LoRA(rank=8, targets=vit.DEFAULT_TARGETS["all-linear"], exclude=vit.ALL_LINEAR_EXCLUDE)
    adapted = jlora.apply(params, spec, key, model=model.apply, example=(images,))
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import re
import warnings
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jlora.distributed.sharding import constrain_batch
from jlora.models.bert import ACTIVATIONS
from jlora.models import _hf
from jlora.models import bert as _bert

__all__ = [
    "ViTConfig", "ViTModel", "ViTForImageClassification", "ViTEmbeddings", "ViTPatchEmbeddings",
    "ViTLayer", "ViTEncoder", "load_hf_params", "load_pretrained", "stack_layers", "unstack_layers",
    "hf_module_name", "DEFAULT_TARGETS", "partition_rules", "ALL_LINEAR_EXCLUDE", "ACTIVATIONS",
]

#: LoRA target regexes over jlora paths. ``"default"`` is PEFT's usual ViT choice (query and
#: value); ``"all-linear"`` is every Linear inside the encoder (query, key, value, attention
#: output, intermediate and output dense). Neither touches the patch-embedding conv
#: (``.*/patch_embeddings/projection/kernel``, which LoRA can adapt too: add it to ``targets``).
DEFAULT_TARGETS = {
    "default": r".*/attention/attention/(query|value)/kernel",
    "all-linear": r".*/(query|key|value|dense)/kernel",
}
#: Exclude pattern for ``DEFAULT_TARGETS["all-linear"]`` (and broader patterns such as
#: ``".*kernel"``): the classification head and a pooler, which are trained in full
#: (PEFT's ``modules_to_save``), not adapted.
ALL_LINEAR_EXCLUDE = r"(.*/)?(pooler|classifier)/.*"


# ---------------------------------------------------------------------------------------------
# config

def _is_pos_int(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, np.integer)) and v >= 1


def _canon_size(value, name):
    """An int, or an ``(h, w)`` pair (a list or tuple; equal sides collapse to an int)."""
    if _is_pos_int(value):
        return int(value)
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(_is_pos_int(v) for v in value):
        h, w = int(value[0]), int(value[1])
        return h if h == w else (h, w)
    raise ValueError(f"ViTConfig.{name} must be a positive int or an (height, width) pair of them, got {value!r}")


def _hw(size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else tuple(size)


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """Hyper-parameters of a ViT (defaults: google/vit-base-patch16-224, an ImageNet-1k head).

    ``image_size`` / ``patch_size`` are ints (square) or ``(height, width)`` pairs; as in PyTorch's
    strided conv, pixels past the last whole patch are dropped. ``dtype`` is the compute dtype
    (LayerNorm statistics and the attention softmax always run in float32), ``param_dtype`` the
    dtype parameters are created and loaded in. ``scan_layers`` runs the encoder as one
    ``nn.scan`` (params stacked on axis 0 under ``encoder/layers``); ``remat`` rematerialises
    each layer in the backward pass.
    """

    image_size: Any = 224
    patch_size: Any = 16
    num_channels: int = 3
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    qkv_bias: bool = True
    num_labels: int = 1000
    hidden_dropout_prob: float = 0.0
    attention_probs_dropout_prob: float = 0.0
    initializer_range: float = 0.02
    scan_layers: bool = False
    remat: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    _INT_FIELDS = ("num_channels", "hidden_size", "num_hidden_layers", "num_attention_heads",
                   "intermediate_size", "num_labels")

    def __post_init__(self):
        _hf.check_positive_ints(self, "ViTConfig", self._INT_FIELDS)
        object.__setattr__(self, "image_size", _canon_size(self.image_size, "image_size"))
        object.__setattr__(self, "patch_size", _canon_size(self.patch_size, "patch_size"))
        if any(p > i for p, i in zip(_hw(self.patch_size), _hw(self.image_size))):
            raise ValueError(f"ViTConfig.patch_size {self.patch_size!r} is larger than image_size {self.image_size!r}")
        _hf.check_encoder_shape(self, "ViTConfig", ACTIVATIONS)
        _hf.check_probabilities(self, "ViTConfig", ("hidden_dropout_prob", "attention_probs_dropout_prob"))
        if isinstance(self.initializer_range, bool) or not isinstance(self.initializer_range, (int, float)) \
                or self.initializer_range < 0:
            raise ValueError(f"ViTConfig.initializer_range must be >= 0, got {self.initializer_range!r}")
        _hf.check_remat(self, "ViTConfig")
        _hf.check_bools_and_dtypes(self, "ViTConfig", ("qkv_bias", "scan_layers"))

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def image_hw(self) -> tuple[int, int]:
        return _hw(self.image_size)

    @property
    def patch_hw(self) -> tuple[int, int]:
        return _hw(self.patch_size)

    @property
    def grid(self) -> tuple[int, int]:
        """Patches along (height, width)."""
        return tuple(i // p for i, p in zip(self.image_hw, self.patch_hw))

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def seq_len(self) -> int:
        """Tokens per image: the CLS token and one per patch."""
        return self.num_patches + 1

    def partition_rules(self) -> list:
        """This model's logical partition rules (:func:`partition_rules`); resolve them for a mesh
        with :func:`jlora.distributed.resolve_rules`."""
        return partition_rules(self)

    def replace(self, **changes) -> "ViTConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf(cls, config: Mapping | str | os.PathLike, **overrides) -> "ViTConfig":
        """From a Hugging Face ``config.json``: a dict, the file, the directory holding it, or a
        ``transformers.ViTConfig``.

        HF keys that are not fields are ignored (``encoder_stride``, ``pooler_act``, ``architectures``
        ...); ``num_labels`` is read from ``num_labels`` or ``id2label``. A ``model_type`` other than
        ``vit`` (DeiT's distillation token, ViT-MAE, DINOv2 ... are different models) raises.
        ``overrides`` must be field names (e.g. ``scan_layers=True, dtype=jnp.bfloat16``).
        """
        config = _hf.read_config(config, "ViTConfig", "ViT")
        fields = _hf.config_fields(cls, overrides)
        model_type = config.get("model_type", "vit")
        if model_type not in ("vit", None):
            raise ValueError(f"config has model_type={model_type!r}; only 'vit' checkpoints are supported")
        return cls(**_hf.config_kwargs(config, fields, overrides))


# ---------------------------------------------------------------------------------------------
# modules

def _dense(cfg: ViTConfig, features: int, name: str, use_bias: bool = True) -> nn.Dense:
    return nn.Dense(features, use_bias=use_bias, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                    kernel_init=nn.initializers.normal(cfg.initializer_range), name=name)


def _layer_norm(cfg: ViTConfig, name: str) -> nn.LayerNorm:
    # exact two-pass variance: eps is 1e-12, so E[x^2]-E[x]^2 would drift from PyTorch
    return nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                        use_fast_variance=False, name=name)


class ViTPatchEmbeddings(nn.Module):
    """``(B, H, W, C)`` -> ``(B, num_patches, hidden)``: a conv with kernel = stride = patch,
    patches in row-major order (HF's ``flatten(2).transpose(1, 2)``)."""

    config: ViTConfig

    @nn.compact
    def __call__(self, images):
        cfg = self.config
        x = nn.Conv(cfg.hidden_size, kernel_size=cfg.patch_hw, strides=cfg.patch_hw, padding="VALID",
                    dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                    kernel_init=nn.initializers.lecun_normal(), name="projection")(images)
        return x.reshape(x.shape[0], -1, cfg.hidden_size)


class ViTEmbeddings(nn.Module):
    """CLS token + patch embeddings, plus learned position embeddings, then dropout."""

    config: ViTConfig

    @nn.compact
    def __call__(self, images, deterministic: bool = True):
        cfg = self.config
        init = nn.initializers.truncated_normal(cfg.initializer_range)
        cls_token = self.param("cls_token", init, (1, 1, cfg.hidden_size), cfg.param_dtype)
        pos = self.param("position_embeddings", init, (1, cfg.seq_len, cfg.hidden_size), cfg.param_dtype)
        x = ViTPatchEmbeddings(cfg, name="patch_embeddings")(images)
        cls = jnp.broadcast_to(cls_token.astype(x.dtype), (x.shape[0], 1, cfg.hidden_size))
        x = jnp.concatenate([cls, x], axis=1) + pos.astype(x.dtype)
        return nn.Dropout(cfg.hidden_dropout_prob)(x, deterministic=deterministic)


class ViTSelfAttention(nn.Module):
    config: ViTConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        h, d = cfg.num_attention_heads, cfg.head_dim
        split = lambda t: t.reshape(t.shape[:-1] + (h, d))
        q = split(_dense(cfg, cfg.hidden_size, "query", cfg.qkv_bias)(x))
        k = split(_dense(cfg, cfg.hidden_size, "key", cfg.qkv_bias)(x))
        v = split(_dense(cfg, cfg.hidden_size, "value", cfg.qkv_bias)(x))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / math.sqrt(d)
        probs = jax.nn.softmax(scores, axis=-1).astype(cfg.dtype)
        probs = nn.Dropout(cfg.attention_probs_dropout_prob)(probs, deterministic=self.deterministic)
        ctx = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
        return ctx.reshape(ctx.shape[:-2] + (cfg.hidden_size,))


class _DenseDropout(nn.Module):
    """HF ``ViTSelfOutput`` / ``ViTOutput`` body: dense -> dropout (the residual is added by the layer)."""

    config: ViTConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        x = _dense(cfg, cfg.hidden_size, "dense")(x)
        return nn.Dropout(cfg.hidden_dropout_prob)(x, deterministic=self.deterministic)


class ViTAttention(nn.Module):
    config: ViTConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x):
        ctx = ViTSelfAttention(self.config, self.deterministic, name="attention")(x)
        return _DenseDropout(self.config, self.deterministic, name="output")(ctx)


class ViTIntermediate(nn.Module):
    config: ViTConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        return ACTIVATIONS[cfg.hidden_act](_dense(cfg, cfg.intermediate_size, "dense")(x))


class ViTLayer(nn.Module):
    """One pre-LN encoder layer. ``(hidden, None) -> (hidden, None)`` so it can be scanned."""

    config: ViTConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, _=None):
        cfg = self.config
        x = constrain_batch(x)   # activations stay split over the batch axes (see jlora.distributed)
        x = x + ViTAttention(cfg, self.deterministic, name="attention")(_layer_norm(cfg, "layernorm_before")(x))
        x = constrain_batch(x)
        h = ViTIntermediate(cfg, name="intermediate")(_layer_norm(cfg, "layernorm_after")(x))
        x = x + _DenseDropout(cfg, self.deterministic, name="output")(h)
        return constrain_batch(x), None


class ViTEncoder(nn.Module):
    config: ViTConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        layer_cls = _hf.remat_layer(ViTLayer, cfg.remat, cfg.scan_layers)
        if cfg.scan_layers:
            scanned = nn.scan(layer_cls, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                              length=cfg.num_hidden_layers)
            x, _ = scanned(cfg, self.deterministic, name="layers")(x, None)
            return x
        for i in range(cfg.num_hidden_layers):
            x, _ = layer_cls(cfg, self.deterministic, name=f"layer_{i}")(x, None)
        return x


def _check_images(cfg: ViTConfig, images):
    images = jnp.asarray(images)
    want = cfg.image_hw + (cfg.num_channels,)
    if images.ndim != 4 or tuple(images.shape[1:]) != want:
        hint = ""
        if images.ndim == 4 and images.shape[1] == cfg.num_channels and tuple(images.shape[2:]) == cfg.image_hw:
            hint = " (this looks like NCHW pixel_values: pass pixel_values.transpose(0, 2, 3, 1))"
        raise ValueError(f"images must be NHWC (batch, {want[0]}, {want[1]}, {want[2]}), got shape "
                         f"{tuple(images.shape)}{hint}")
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise ValueError(f"images must be floating point (normalised pixels), got dtype {images.dtype}")
    return images.astype(cfg.dtype)


def _vit_body(cfg, images, deterministic):
    """Shared by both models (called inside their compact ``__call__``, so the submodules land at
    the top of the caller's scope)."""
    x = ViTEmbeddings(cfg, name="embeddings")(_check_images(cfg, images), deterministic)
    x = ViTEncoder(cfg, deterministic, name="encoder")(x)
    return _layer_norm(cfg, "layernorm")(x)


class ViTModel(nn.Module):
    """Patch + position embeddings -> pre-LN encoder -> final LayerNorm.

    ``images`` are NHWC floats ``(batch, height, width, channels)``; returns the sequence output
    ``(batch, 1 + num_patches, hidden)`` (token 0 is CLS). HF's optional pooler is not built.
    Dropout runs when ``deterministic=False`` with a ``"dropout"`` rng.
    """

    config: ViTConfig

    @nn.compact
    def __call__(self, images, deterministic: bool = True):
        return _vit_body(self.config, images, deterministic)


class ViTForImageClassification(nn.Module):
    """ViT -> ``classifier`` Dense(num_labels) on the final-LayerNorm'ed CLS token. Returns logits.

    The encoder's parameters sit at the top of the tree (``params/embeddings``, ``params/encoder``,
    ``params/layernorm``), the same as :class:`ViTModel`'s, next to ``params/classifier``.
    """

    config: ViTConfig

    @nn.compact
    def __call__(self, images, deterministic: bool = True):
        cfg = self.config
        x = _vit_body(cfg, images, deterministic)
        return _dense(cfg, cfg.num_labels, "classifier")(x[:, 0])


# ---------------------------------------------------------------------------------------------
# layouts: per-layer <-> stacked (the same encoder/layer_i <-> encoder/layers convention as BERT)

def stack_layers(params):
    """Per-layer layout (``encoder/layer_0 ... layer_{L-1}``) -> scanned layout
    (``encoder/layers``, every leaf stacked on a new axis 0). Accepts ``{"params": ...}`` or the
    inner dict; returns the same kind. Leaves must be arrays (stack before ``jlora.apply``)."""
    return _bert.stack_layers(params)


def unstack_layers(params):
    """Inverse of :func:`stack_layers`: ``encoder/layers`` (stacked on axis 0) -> ``encoder/layer_i``."""
    return _bert.unstack_layers(params)


# ---------------------------------------------------------------------------------------------
# names: jlora paths <-> Hugging Face

_LEAF_NAMES = {"kernel": "weight", "bias": "bias", "scale": "weight"}
_RAW_PARAMS = ("cls_token", "position_embeddings")
_LAYER_KEY = _hf.LAYER_KEY

# transformers >= 5 in-memory module names -> checkpoint names (within one layer, after "layers.N.")
_T5_TO_CHECKPOINT = (
    ("attention.q_proj", "attention.attention.query"),
    ("attention.k_proj", "attention.attention.key"),
    ("attention.v_proj", "attention.attention.value"),
    ("attention.o_proj", "attention.output.dense"),
    ("mlp.fc1", "intermediate.dense"),
    ("mlp.fc2", "output.dense"),
)


def hf_module_name(path: str, layer: int | None = None, prefix: str = "vit.", naming: str = "checkpoint") -> str:
    """The Hugging Face / PEFT module name of a jlora parameter path.

    ``path`` may start with ``params/`` or not, and may end with the leaf name (``kernel``,
    ``bias``, ``scale``) or stop at the module; the result is the module name (no ``.weight``),
    e.g. ``params/encoder/layer_3/attention/attention/query/kernel`` ->
    ``vit.encoder.layer.3.attention.attention.query``. ``cls_token`` and ``position_embeddings``
    are bare parameters of ``embeddings`` and come back as their parameter names
    (``vit.embeddings.cls_token``). For the scanned layout (``encoder/layers/...``) pass the layer
    index as ``layer``.

    ``prefix`` is prepended to the backbone's names (``embeddings``, ``encoder``, ``layernorm``):
    ``"vit."`` gives the names inside ``transformers.ViTForImageClassification``; pass ``""`` for
    a bare ``ViTModel``. ``classifier`` never takes the prefix. ``naming="checkpoint"`` gives the
    names used by checkpoint files and transformers < 5 modules (hence by PEFT adapters trained
    there); ``naming="transformers5"`` the module names of transformers >= 5
    (``vit.layers.3.attention.q_proj``, ``...attention.o_proj``, ``...mlp.fc1``, ``...mlp.fc2``).
    """
    if naming not in ("checkpoint", "transformers5"):
        raise ValueError(f"naming must be 'checkpoint' or 'transformers5', got {naming!r}")
    parts = _hf.module_parts(path, _LEAF_NAMES)
    if not parts:
        raise ValueError(f"{path!r} names no module")
    head = parts[0]
    if head == "classifier":
        if len(parts) != 1:
            raise ValueError(f"unexpected path under classifier: {path!r}")
        if layer is not None:
            raise ValueError(f"layer={layer} given for {path!r}, which is not inside the encoder")
        return "classifier"
    if head not in ("embeddings", "encoder", "layernorm"):
        raise ValueError(f"{path!r} is not a ViT parameter path (expected embeddings/, encoder/, layernorm/ or classifier/)")
    rest = parts[1:]
    if head != "encoder":
        if layer is not None:
            raise ValueError(f"layer={layer} given for {path!r}, which is not inside the encoder")
        return prefix + ".".join([head] + rest)
    if not rest:
        raise ValueError(f"{path!r} names the whole encoder, not a module")
    idx = _hf.encoder_layer_index(path, rest[0], layer)
    inner = ".".join(rest[1:])
    if naming == "checkpoint":
        return prefix + f"encoder.layer.{idx}" + ("." + inner if inner else "")
    for new, old in _T5_TO_CHECKPOINT:
        if inner == old or inner.startswith(old + "."):
            inner = new + inner[len(old):]
            break
    return prefix + f"layers.{idx}" + ("." + inner if inner else "")


def _expected_tensors(cfg: ViTConfig, with_classifier: bool):
    """``[(hf_name, jlora_path_tuple, hf_shape, permutation or None)]`` for the per-layer layout,
    in checkpoint naming without the ``vit.`` prefix."""
    H, I, C = cfg.hidden_size, cfg.intermediate_size, cfg.num_channels
    ph, pw = cfg.patch_hw
    T = (1, 0)
    out = [("embeddings.cls_token", ("embeddings", "cls_token"), (1, 1, H), None),
           ("embeddings.position_embeddings", ("embeddings", "position_embeddings"), (1, cfg.seq_len, H), None),
           # Conv2d OIHW -> Flax HWIO
           ("embeddings.patch_embeddings.projection.weight", ("embeddings", "patch_embeddings", "projection", "kernel"),
            (H, C, ph, pw), (2, 3, 1, 0)),
           ("embeddings.patch_embeddings.projection.bias", ("embeddings", "patch_embeddings", "projection", "bias"),
            (H,), None)]

    def dense(hf, path, din, dout, bias=True):
        out.append((hf + ".weight", path + ("kernel",), (dout, din), T))
        if bias:
            out.append((hf + ".bias", path + ("bias",), (dout,), None))

    def norm(hf, path):
        out.append((hf + ".weight", path + ("scale",), (H,), None))
        out.append((hf + ".bias", path + ("bias",), (H,), None))

    for i in range(cfg.num_hidden_layers):
        hf, p = f"encoder.layer.{i}.", ("encoder", f"layer_{i}")
        norm(hf + "layernorm_before", p + ("layernorm_before",))
        for proj in ("query", "key", "value"):
            dense(hf + f"attention.attention.{proj}", p + ("attention", "attention", proj), H, H, cfg.qkv_bias)
        dense(hf + "attention.output.dense", p + ("attention", "output", "dense"), H, H)
        norm(hf + "layernorm_after", p + ("layernorm_after",))
        dense(hf + "intermediate.dense", p + ("intermediate", "dense"), H, I)
        dense(hf + "output.dense", p + ("output", "dense"), I, H)
    norm("layernorm", ("layernorm",))
    if with_classifier:
        dense("classifier", ("classifier",), H, cfg.num_labels)
    return out


_T5_LAYER = re.compile(r"^layers\.(\d+)\.(.*)$")


def _normalise_hf_name(name: str) -> str:
    """Checkpoint naming without the ``vit.`` prefix, from either naming."""
    if name.startswith("vit."):
        name = name[len("vit."):]
    m = _T5_LAYER.match(name)
    if m:
        inner = m.group(2)
        for new, old in _T5_TO_CHECKPOINT:
            if inner.startswith(new + "."):
                inner = old + inner[len(new):]
                break
        name = f"encoder.layer.{m.group(1)}.{inner}"
    return name


def _duplicate_message(path, first, name):
    return f"{path}: tensors {first!r} and {name!r} name the same parameter"


def load_hf_params(source, config: ViTConfig, *, strict: bool = False):
    """Reads a Hugging Face ViT safetensors file (or a directory holding ``model.safetensors``)
    into ``{"params": ...}`` for :class:`ViTModel` / :class:`ViTForImageClassification`.

    Tensor names may carry a ``vit.`` prefix or not, and may use the checkpoint naming
    (``encoder.layer.0.attention.attention.query.weight``, what files on the Hub and
    ``save_pretrained`` hold) or transformers >= 5's in-memory naming (``layers.0.attention.q_proj.weight``,
    what ``model.state_dict()`` gives there). Linear weights are transposed to ``(in, out)``, the
    patch conv weight from OIHW to HWIO; values are cast to ``config.param_dtype``; the layout is
    stacked when ``config.scan_layers``. ``classifier.*`` is loaded when present (shape checked
    against ``config.num_labels``). Every expected tensor must exist with the expected shape
    (the position-embedding table fixes ``image_size`` / ``patch_size``), else a ``ValueError``
    lists each offending tensor with the expected and found shapes. Tensors left unused
    (a pooler, a mask token) are reported with a warning (an error with ``strict=True``).
    """
    tensors, original, p = _hf.read_safetensors(source, _normalise_hf_name, _duplicate_message)
    expected = _expected_tensors(config, with_classifier=any(k.startswith("classifier.") for k in tensors))
    params, problems, used = _hf.collect_params(expected, tensors, original, config.param_dtype)
    _hf.raise_problems(problems, p, config)
    _hf.report_unused(p, original, used, "ViT", strict=strict)
    tree = {"params": params}
    return stack_layers(tree) if config.scan_layers else tree


def load_pretrained(directory, num_labels: int | None = None, scan_layers: bool = False,
                    dtype=jnp.float32, param_dtype=jnp.float32, remat: bool = False, seed: int = 0,
                    **overrides):
    """``(model, params)`` for a Hugging Face ViT directory (``config.json`` + ``model.safetensors``).

    No ViT checkpoint ships with this environment, so ``directory`` is required. ``num_labels=None``
    gives a :class:`ViTModel` (any classifier in the file is dropped); an int gives a
    :class:`ViTForImageClassification` whose head comes from the checkpoint when it has one of
    that size, else is new: kernel ~ N(0, 0.02) from ``jax.random.key(seed)``, zero bias. A pooler
    in the file (ViTModel checkpoints) is ignored without a warning.
    """
    directory = pathlib.Path(directory)
    extra = dict(scan_layers=scan_layers, remat=remat, dtype=dtype, param_dtype=param_dtype, **overrides)
    if num_labels is not None:
        extra["num_labels"] = num_labels
    cfg = ViTConfig.from_hf(directory, **extra)
    file_labels = ViTConfig.from_hf(directory).num_labels
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*not used by the ViT model: \[('(vit\.)?pooler\.[^']*'(, )?)+\]$")
        if num_labels is not None and num_labels != file_labels:
            # the checkpoint's head does not fit the new one: load it at its own size, then drop it
            params = load_hf_params(directory, cfg.replace(num_labels=file_labels))
            params["params"].pop("classifier", None)
        else:
            params = load_hf_params(directory, cfg)
    if num_labels is None:
        model = ViTModel(cfg)
        params["params"].pop("classifier", None)
    else:
        model = ViTForImageClassification(cfg)
        _hf.add_new_classifier(params, cfg, seed)
    return model, params


def partition_rules(config: ViTConfig) -> list:
    """Logical partition rules for this model's parameters (see
    :func:`jlora.models.llama.partition_rules`); with ``scan_layers`` the encoder's weights have the
    stacked ``layers`` axis first. The patch projection splits its output (``embed``) axis; the
    attention and MLP kernels split along ``embed`` and ``heads`` / ``mlp``; norms, embeddings and
    the classifier are replicated."""
    s = ("layers",) if config.scan_layers else ()
    return [
        (r"patch_embeddings/projection/kernel$", (None, None, None, "embed")),
        (r"attention/attention/(query|key|value)/kernel$", s + ("embed", "heads")),
        (r"attention/attention/(query|key|value)/bias$", s + ("heads",)),
        (r"attention/output/dense/kernel$", s + ("heads", "embed")),
        (r"intermediate/dense/kernel$", s + ("embed", "mlp")),
        (r"intermediate/dense/bias$", s + ("mlp",)),
        (r"encoder/layers?(_\d+)?/output/dense/kernel$", s + ("mlp", "embed")),
    ]
