"""LoRA (Hu et al. 2021) with rsLoRA scaling and PiSSA / OLoRA initialisation.

``delta W = scale * A @ B`` with ``A: inputs x r`` and ``B: r x outputs`` (Flax layout);
``scale = alpha / r`` or ``alpha / sqrt(r)`` with ``rslora=True``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jlora.core.errors import PeftFormatError
from jlora.core.nodes import AdapterMeta, Layout
from jlora.core.spec import AdapterSpec
from jlora.core.state import LoRAState, register_base_rewriting_init
from jlora.methods import _peft as peft_format

INITS = ("kaiming", "gaussian", "pissa", "olora", "zeros_b_normal")
register_base_rewriting_init("pissa", "olora")   # their base is W - s * A0 @ B0


def _pattern_value(patterns, path: str, default):
    """PEFT's ``rank_pattern`` / ``alpha_pattern`` lookup: key matches ``(.*/)?key`` at the end
    of the module path (the path without its final leaf name) or of the full path."""
    if not patterns:
        return default
    module = path.rsplit("/", 1)[0] if "/" in path else path
    for key, value in patterns:
        regex = rf"(.*/)?({key})"
        if re.fullmatch(regex, module) or re.fullmatch(regex, path):
            return value
    return default


@dataclasses.dataclass(frozen=True)
class LoRA(AdapterSpec):
    """Low-rank adaptation spec.

    Example:

    >>> import jax, jax.numpy as jnp, jlora
    >>> params = {"params": {"query": {"kernel": jnp.ones((8, 8))}, "value": {"kernel": jnp.ones((8, 8))},
    ...                      "key": {"kernel": jnp.ones((8, 8))}}}
    >>> spec = jlora.LoRA(rank=4, alpha=16, targets=r".*/(query|value)/kernel", rank_pattern={"value": 2})
    >>> adapted = jlora.apply(params, spec, key=jax.random.key(0))
    >>> [(k, adapted["params"][k]["kernel"].meta["default"].rank) for k in ("query", "value")]
    [('query', 4), ('value', 2)]
    >>> spec.scale_for("params/query/kernel"), type(adapted["params"]["key"]["kernel"]).__name__
    (4.0, 'ArrayImpl')

    Args:
      rank: adapter rank r (> 0).
      alpha: scale numerator; ``scale = alpha / r`` (``alpha / sqrt(r)`` with ``rslora``).
      targets: regex (full match on ``a/b/kernel`` paths) or list of names/regexes.
      exclude: patterns that are never adapted (wins over ``targets``).
      dropout: dropout probability on the adapter's input (needs ``jlora_rng=`` at call time).
      rslora: rank-stabilised scaling.
      init: "kaiming" (PEFT default: A ~ U(+-1/sqrt(fan_in)), B = 0), "gaussian"
        (A ~ N(0, 1/r^2), B = 0), "pissa" (top-r singular vectors, base = residual),
        "olora" (QR of the weight, base = residual).
      rank_pattern / alpha_pattern: ``{pattern: value}`` overrides per path (PEFT semantics).
      train_also: patterns of leaves trained in full (PEFT's ``modules_to_save``).
      axes: ``{pattern: jlora.Axes(stack=, inputs=)}`` hints for N-D kernels.
      dtype: dtype of the factors (default float32, whatever the base dtype).
    """

    rank: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    rslora: bool = False
    init: str = "kaiming"
    rank_pattern: Mapping[str, int] | None = None
    alpha_pattern: Mapping[str, float] | None = None
    dtype: Any = jnp.float32

    method = "lora"
    cli_method = "lora"

    def __post_init__(self):
        self._validate_common()
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise ValueError(f"LoRA rank must be a positive int, got {self.rank!r}")
        if not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool) or not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ValueError(f"LoRA alpha must be a positive finite number, got {self.alpha!r}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        if self.init not in INITS:
            raise ValueError(f"LoRA init must be one of {INITS}, got {self.init!r}")
        for name in ("rank_pattern", "alpha_pattern"):
            value = getattr(self, name)
            if value is None:
                object.__setattr__(self, name, ())
                continue
            if not isinstance(value, Mapping):
                raise TypeError(f"{name} must be a mapping of pattern -> value, got {value!r}")
            for k, v in value.items():
                bad = (name == "rank_pattern" and (not isinstance(v, int) or v < 1)) or \
                      (name == "alpha_pattern" and (not isinstance(v, (int, float)) or v <= 0))
                if bad:
                    raise ValueError(f"{name}[{k!r}] must be a positive {'int' if name == 'rank_pattern' else 'number'}, got {v!r}")
            object.__setattr__(self, name, tuple(value.items()))
        try:
            jnp.dtype(self.dtype)
        except TypeError:
            raise TypeError(f"LoRA dtype must be a floating dtype, got {self.dtype!r}") from None

    # -- per-leaf hyper-parameters -------------------------------------------------------
    def rank_for(self, path: str) -> int:
        return _pattern_value(self.rank_pattern, path, self.rank)

    def alpha_for(self, path: str) -> float:
        return float(_pattern_value(self.alpha_pattern, path, self.alpha))

    def scale_for(self, path: str) -> float:
        r, alpha = self.rank_for(path), self.alpha_for(path)
        return alpha / math.sqrt(r) if self.rslora else alpha / r

    # -- node construction -----------------------------------------------------------------
    def init_state(self, key, base, layout: Layout, path: str, embedding: bool = False):
        """``(LoRAState(a, b), new_base, meta)`` for one leaf."""
        a, b, new_base, meta = self.init_factors(key, base, layout, path, embedding=embedding)
        return LoRAState(a, b), new_base, meta

    def init_factors(self, key, base, layout: Layout, path: str, embedding: bool = False):
        """Returns ``(a, b, new_base, AdapterMeta)`` for one leaf."""
        rank = self.rank_for(path)
        scale = self.scale_for(path)
        stack, inputs, outputs = layout.split(base.shape)
        n_in, n_out = math.prod(inputs), math.prod(outputs)
        if rank > min(n_in, n_out):
            raise ValueError(
                f"rank {rank} for {path!r} exceeds min(inputs={n_in}, outputs={n_out}) of kernel {tuple(base.shape)}")
        dtype = jnp.dtype(self.dtype)
        a_shape, b_shape = stack + inputs + (rank,), stack + (rank,) + outputs
        new_base = base
        init = self.init
        ka, kb = jax.random.split(key)
        if embedding and init in ("kaiming", "gaussian"):
            init = "zeros_b_normal"  # PEFT's embedding LoRA: A = 0, B ~ N(0, 1)
        if init == "kaiming":
            bound = 1.0 / math.sqrt(n_in)
            a = jax.random.uniform(ka, a_shape, dtype, -bound, bound)
            b = jnp.zeros(b_shape, dtype)
        elif init == "gaussian":
            a = jax.random.normal(ka, a_shape, dtype) / rank
            b = jnp.zeros(b_shape, dtype)
        elif init == "zeros_b_normal":
            a = jnp.zeros(a_shape, dtype)
            b = jax.random.normal(kb, b_shape, dtype)
        else:
            a, b, new_base = _svd_or_qr_init(init, base, layout, rank, scale, dtype)
        meta = AdapterMeta(method=self.method, rank=rank, scale=scale, dropout=float(self.dropout), init=init)
        return a, b, new_base, meta


def _svd_or_qr_init(init, base, layout: Layout, rank: int, scale: float, dtype):
    stack, inputs, outputs = layout.split(base.shape)
    n_in, n_out = math.prod(inputs), math.prod(outputs)
    w = base.astype(jnp.float32).reshape(stack + (n_in, n_out))
    if init == "pissa":
        # PEFT pissa_init on W_pt = K^T: A = sqrt(S_r/s) Vh_r-side, B = ..., base = W - s*A@B.
        u, s_vals, vh = jnp.linalg.svd(w, full_matrices=False)
        root = jnp.sqrt(s_vals[..., :rank] / scale)
        a = u[..., :, :rank] * root[..., None, :]
        b = root[..., :, None] * vh[..., :rank, :]
    elif init == "olora":
        # PEFT olora_init: Q, R = qr(W_pt); A_pt = R[:r], B_pt = Q[:, :r]; base = W - s*B_pt@A_pt.
        q, r = jnp.linalg.qr(jnp.swapaxes(w, -1, -2))  # W_pt: (out, in)
        a = jnp.swapaxes(r[..., :rank, :], -1, -2)       # (in, r)
        b = jnp.swapaxes(q[..., :, :rank], -1, -2)       # (r, out)
    else:  # pragma: no cover - guarded by validation
        raise ValueError(init)
    residual = w - scale * (a @ b)
    new_base = residual.reshape(base.shape).astype(base.dtype)
    a = a.reshape(stack + inputs + (rank,)).astype(dtype)
    b = b.reshape(stack + (rank,) + outputs).astype(dtype)
    return a, b, new_base


# ------------------------------------------------------------------------------------------
# PEFT files: peft_type "LORA" (lora_A / lora_B per module)

#: LoRA config fields naming variants jlora does not read
UNSUPPORTED_PEFT_FIELDS = {
    "lora_bias": "LoRA B biases (lora_bias=true)",
    "layer_replication": "layer_replication",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
    "target_parameters": "target_parameters (LoRA on raw parameters)",
    "use_qalora": "QA-LoRA (use_qalora=true)",
    "use_bdlora": "BD-LoRA (use_bdlora)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "arrow_config": "Arrow routing (arrow_config)",
}


def check_lora_config_fields(config: dict, file: str) -> None:
    """The LoRA / AdaLoRA fields that set the adapter's maths, type-checked (an edited or hand-written
    config must not load as something else): ``r`` a positive int, ``lora_alpha`` a finite number,
    ``use_rslora`` / ``use_dora`` booleans, patterns mappings, ``target_modules`` a regex or names."""
    for field, what in UNSUPPORTED_PEFT_FIELDS.items():
        if config.get(field):
            raise PeftFormatError(f"{file}: {what} is not supported by jlora.io.load_peft ({field}={config[field]!r})")

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


def init_changed_base_warning(config) -> str | None:
    """PEFT inits that rewrite the base weights (PiSSA, OLoRA, CorDA, EVA, LoftQ): the file alone only
    reproduces the trained model on top of those changed weights."""
    init = str(config.get("init_lora_weights")).lower()
    if init in ("pissa", "olora", "corda", "eva", "loftq") or init.startswith("pissa"):
        return (f"this adapter was initialised with init_lora_weights={config['init_lora_weights']!r}, which changes "
                f"the base weights; unless it was saved with path_initial_model_for_weight_conversion it only "
                f"reproduces the trained model on top of those changed weights")
    return None


def lora_factor_tensors(node, adapter, leaf_path, stack, n_in, n_out, embedding):
    """``({"lora_A.weight": (r, in), "lora_B.weight": (out, r)}, r)`` (``lora_embedding_A/B`` for an
    embedding table; stacked over layers when ``stack``) of a low-rank adapter."""
    state = node.states[adapter]
    found = state.factors(node.layout)
    if found is None:
        raise ValueError(f"save_peft needs the full adapted tree (jlora.combine(trainable, frozen)); "
                         f"{leaf_path!r} is missing the factors of adapter {adapter!r}")
    a, b = found
    r = int(a.shape[-1])
    a = np.asarray(a).reshape(stack + (n_in, r))
    b = np.asarray(b).reshape(stack + (r, n_out))
    key_a, key_b = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A.weight", "lora_B.weight")
    return {key_a: np.swapaxes(a, -1, -2), key_b: np.swapaxes(b, -1, -2)}, r  # (r, in), (out, r)


def read_lora_factors(target, fixed_scale=None):
    """``(a, b, layout, rank, scale)`` from the modules' ``lora_A`` / ``lora_B`` (``parts[m]["A"]`` /
    ``["B"]``), reshaped to the kernel's axes and stacked over layers. Ranks that differ between the
    layers of a stacked kernel are zero-padded; scales that differ are folded into ``b``. The scale
    is the config's (``r`` / ``lora_alpha`` / patterns / ``use_rslora``) unless ``fixed_scale``."""
    leaf_path, shape, stacked, names, parts = target.leaf_path, target.shape, target.stacked, target.names, target.parts
    config, weights_file, layout = target.config, target.weights_file, target.layout
    rest = shape[1:] if stacked else shape
    if len({bool(parts[n].get("embedding")) for n in names}) > 1:
        raise PeftFormatError(f"{weights_file}: the layers of {leaf_path!r} mix Linear and Embedding LoRA weights")
    first_a, first_b = parts[names[0]]["A"], parts[names[0]]["B"]
    if first_a.ndim != 2 or first_b.ndim != 2:
        raise PeftFormatError(f"{weights_file}: {names[0]!r}: expected 2-D lora_A / lora_B, found shapes "
                              f"{first_a.shape} and {first_b.shape} (convolution LoRA is not supported)")
    if layout is None:
        k = peft_format.split_layout(rest, first_a.shape[1], first_b.shape[0], leaf_path)
        if k is None:
            raise PeftFormatError(f"{weights_file}: shape mismatch for module {names[0]!r} (params {leaf_path!r} "
                                  f"{shape}): found lora_A {first_a.shape}, lora_B {first_b.shape}, which fit no "
                                  f"split of {rest} into inputs x outputs")
        layout = Layout(1 if stacked else 0, k, len(rest) - k)
    _, inputs, outputs = layout.split(shape)
    n_in, n_out = math.prod(inputs), math.prod(outputs)
    r_default, alpha_default = int(config.get("r", 8)), config.get("lora_alpha", 8)
    rslora = bool(config.get("use_rslora", False))
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}

    factors, ranks, scales = [], [], []
    for n in names:
        a, b = parts[n]["A"], parts[n]["B"]
        r = a.shape[0] if a.ndim == 2 else -1
        if a.ndim != 2 or b.ndim != 2 or a.shape != (r, n_in) or b.shape != (n_out, r):
            raise PeftFormatError(
                f"{weights_file}: shape mismatch for module {n!r} (params {leaf_path!r} {shape}, layout {layout}): "
                f"expected lora_A (r, {n_in}) and lora_B ({n_out}, r), found {tuple(a.shape)} and {tuple(b.shape)}")
        if fixed_scale is None:   # r and alpha from the config's patterns
            r_cfg = int(peft_format.pattern_value(rank_pattern, n, r_default))
            if r_cfg != r:
                raise PeftFormatError(f"{weights_file}: module {n!r} has rank {r} in the weights but the config says "
                                      f"r={r_cfg} (r / rank_pattern)")
            alpha = peft_format.pattern_value(alpha_pattern, n, alpha_default)
        factors.append((a.T, b.T))
        ranks.append(r)
        scales.append(peft_format.peft_scale(alpha, r, rslora) if fixed_scale is None else fixed_scale)

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
    a = jnp.asarray(peft_format.stack_layers(a_list, stacked))
    b = jnp.asarray(peft_format.stack_layers(b_list, stacked))
    return a, b, layout, int(rank), float(scale)


class LoRACodec(peft_format.PeftCodec):
    """LoRA / QLoRA (written as plain LoRA: a PEFT file holds no quantised base) as peft_type "LORA"."""

    peft_type = "LORA"
    title = "plain LoRA"
    kind = "lora"
    use_dora = False

    def export(self, node, adapter, leaf_path, stack, n_in, n_out, embedding):
        tensors, r = lora_factor_tensors(node, adapter, leaf_path, stack, n_in, n_out, embedding)
        return tensors, r, [{}] * (stack[0] if stack else 1)

    def config(self, modules, ctx):
        rslora = bool(getattr(ctx.spec, "rslora", False)) if ctx.spec is not None else False
        names = list(modules)
        ranks = {m: modules[m].rank for m in names}
        scales = {m: modules[m].scale for m in names}
        alphas = {}
        for m in names:
            r, s = ranks[m], scales[m]
            alphas[m] = peft_format.nice(
                s * (math.sqrt(r) if rslora else r),
                lambda v, r=r, s=s: math.isclose(peft_format.peft_scale(v, r, rslora), s, rel_tol=1e-13, abs_tol=0.0))
        r = peft_format.most_common([ranks[m] for m in names])
        alpha = peft_format.most_common([alphas[m] for m in names])
        return {
            "alpha_pattern": peft_format.pattern_keys(alphas, alpha, names),
            "auto_mapping": None,
            **ctx.provenance,                                # base_model_name_or_path, revision
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
            "lora_dropout": peft_format.most_common([modules[m].dropout for m in names]),
            "megatron_config": None,
            "megatron_core": "megatron.core",
            "modules_to_save": ctx.modules_to_save or None,
            "peft_type": "LORA",
            "r": r,
            "rank_pattern": peft_format.pattern_keys(ranks, r, names),
            "target_modules": ctx.target_modules,
            "task_type": ctx.task_type,
            "use_dora": bool(self.use_dora),
            "use_rslora": rslora,
        }

    def reads(self, config):
        return str(config.get("peft_type")).upper() == "LORA" and bool(config.get("use_dora", False)) == self.use_dora

    def check_config(self, config, file):
        check_lora_config_fields(config, file)

    def load_warning(self, config):
        return init_changed_base_warning(config)

    def parse(self, key, value, modules, weights_file):
        m = (re.fullmatch(r"(.+)\.(lora_A|lora_B)\.weight", key)
             or re.fullmatch(r"(.+)\.(lora_embedding_A|lora_embedding_B)", key))
        if m:
            module, kind = m.group(1), m.group(2)
            modules[module][kind[-1]] = value
            modules[module]["embedding"] = kind.startswith("lora_embedding")
            return True
        magnitude = re.fullmatch(r"(.+)\.lora_magnitude_vector(\.weight)?", key)
        if magnitude:
            if not self.use_dora:
                raise PeftFormatError(f"{weights_file}: {key!r} is a DoRA magnitude, but the config has "
                                      f"use_dora=False")
            modules[magnitude.group(1)]["M"] = value
            return True
        if re.fullmatch(r".+\.lora_B\.bias", key):
            raise PeftFormatError(f"{weights_file}: {key!r} belongs to a LoRA variant jlora does not load (lora_bias)")
        if re.search(r"\.lora_[A-Za-z_]+\b", key):
            raise PeftFormatError(f"{weights_file}: unrecognised LoRA tensor {key!r}")
        return False

    def check_parts(self, module, parts, weights_file):
        for part in ("A", "B"):
            if part not in parts:
                if "M" in parts and not ({"A", "B"} & set(parts)):
                    raise PeftFormatError(f"{weights_file}: module {module!r} has a DoRA lora_magnitude_vector but no "
                                          f"lora_A / lora_B")
                raise PeftFormatError(f"{weights_file}: module {module!r} has lora_{'AB'.replace(part, '')} but no lora_{part}")

    def build(self, target):
        a, b, layout, rank, scale = read_lora_factors(target)
        meta = AdapterMeta(method="lora", rank=rank, scale=scale, dropout=_peft_dropout(target.config), init="peft")
        return peft_format.attach(target.leaf, target.leaf_path, layout, target.adapter, meta, LoRAState(a, b))


def _peft_dropout(config) -> float:
    return float(config.get("lora_dropout", 0.0) or 0.0)


peft_format.register_peft_codec(("lora", "qlora"), LoRACodec())
