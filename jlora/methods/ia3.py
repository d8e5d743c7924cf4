"""IA3 (Liu et al. 2022, "(IA)^3"): learned vectors that rescale activations.

For a targeted kernel ``W0`` (Flax layout ``inputs x outputs``) a vector ``l`` initialised to ones
scales the layer's output, ``y = (x W0) * l`` (attention keys and values), or, for feed-forward
layers, its input, ``y = (x * l) W0`` (the MLP down projection). Merging gives ``W0 * l`` along the
outputs (columns of a Flax kernel) or the inputs (rows); unmerging divides. Only the vectors train.

Difference from PEFT: PEFT's non-feed-forward IA3 multiplies ``base(x)`` *including the bias*
(and scales the bias on merge). jlora's adapter lives on the kernel, so a bias that the model adds
after the matmul is not scaled. The Llama family has no biases on k/v/down; on BERT's key/value
(which have biases) the two differ by ``b * (l - 1)``.

Example::

    spec = jlora.IA3(targets=r".*/(k_proj|v_proj|down_proj)/kernel", feedforward=r".*/down_proj/kernel")
    adapted = jlora.apply(params, spec)
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jlora.core.errors import PeftFormatError
from jlora.core.nodes import AdapterMeta, Layout
from jlora.core.paths import matches, normalize_patterns
from jlora.core.spec import AdapterSpec
from jlora.core.state import AdapterState, Gain, register_state_type
from jlora.methods import _peft as peft_format

#: PEFT's per-architecture IA3 defaults (targets, feed-forward) for jlora's models.
DEFAULTS = {
    "llama": (r".*/(k_proj|v_proj|down_proj)/kernel", r".*/down_proj/kernel"),
    # PEFT's bert entry: ["key", "value", "output.dense"], feed-forward ["output.dense"] (its suffix
    # match takes attention/output/dense as well as the MLP's output/dense)
    "bert": (r".*/(key|value|output/dense)/kernel", r".*/output/dense/kernel"),
}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class IA3State(AdapterState):
    """IA3's state: the vector ``l`` (stack + outputs, or stack + inputs when the adapter's
    ``AdapterMeta.feedforward`` is set). No low-rank term; ``W = W0 * l``."""

    l: Any = None

    exclusive: ClassVar[bool] = True
    title: ClassVar[str] = "IA3"

    def gain(self, meta, layout, w0) -> Gain:
        return Gain(inputs=self.l) if meta.feedforward else Gain(outputs=self.l)


register_state_type("ia3", IA3State)


@dataclasses.dataclass(frozen=True)
class IA3(AdapterSpec):
    """IA3 spec.

    Args:
      targets: patterns of the kernels to rescale (as in :class:`jlora.LoRA`).
      feedforward: patterns (a subset of ``targets``) whose *inputs* are scaled; every other
        target has its outputs scaled. None: no feed-forward layers.
      exclude, train_also, axes: as in :class:`jlora.LoRA`.
      dtype: dtype of the vectors (default float32).
    """

    feedforward: Any = None
    dtype: Any = jnp.float32

    method = "ia3"
    cli_method = "ia3"

    @classmethod
    def from_cli(cls, settings, common, context):
        """``--targets default`` is PEFT's table for the model family (:data:`DEFAULTS`)."""
        if context.family not in DEFAULTS and settings["targets"] == "default":
            raise ValueError(f"IA3 has no default targets for a {context.family} model (PEFT's table covers "
                             f"{sorted(DEFAULTS)}); name them with --targets")
        targets, feedforward = DEFAULTS.get(context.family, (None, None))
        if settings["targets"] != "default":
            targets = common["targets"]
        return cls(targets=targets, feedforward=feedforward, exclude=common["exclude"], train_also=common["train_also"])

    def __post_init__(self):
        self._validate_common()
        object.__setattr__(self, "feedforward", normalize_patterns(self.feedforward, "feedforward"))
        self._check_float_dtype("dtype")

    def is_feedforward(self, path: str) -> bool:
        return bool(self.feedforward) and matches(path, self.feedforward)

    def init_state(self, key, base, layout: Layout, path: str, embedding: bool = False):
        """``(IA3State(ones), base, meta)``: the vector starts at one (a no-op)."""
        if embedding:
            raise ValueError(f"IA3 scales linear layers; {path!r} is an embedding table (narrow the targets)")
        meta = AdapterMeta(method="ia3", rank=0, scale=1.0, dropout=0.0, init="ones",
                           feedforward=self.is_feedforward(path))
        stack, inputs, outputs = layout.split(tuple(base.shape))
        shape = stack + (inputs if meta.feedforward else outputs)
        return IA3State(jnp.ones(shape, jnp.dtype(self.dtype))), base, meta


# ------------------------------------------------------------------------------------------
# PEFT files: peft_type "IA3" (ia3_l per module, feedforward_modules)

def feedforward_match(feedforward_modules, module: str) -> bool:
    """PEFT's ``IA3Model._check_target_module_feedforward``: a str is a fullmatch regex, a list
    matches a plain suffix (``key.endswith(name)``, no ``.`` boundary)."""
    if feedforward_modules is None:
        return False
    if isinstance(feedforward_modules, str):
        return re.fullmatch(feedforward_modules, module) is not None
    return any(module.endswith(f) for f in feedforward_modules)


class IA3Codec(peft_format.PeftCodec):
    """IA3 as an ``IA3Config`` file: ``ia3_l`` (out, 1), or (1, in) for ``feedforward_modules``.
    PEFT's IA3 also scales the bias of a non-feed-forward layer, jlora's does not (both directions warn)."""

    peft_type = "IA3"
    title = "IA3"
    kind = "ia3"
    weights_title = "IA3"
    solo = True
    trains_bias = False

    def export(self, node, adapter, leaf_path, stack, n_in, n_out, embedding):
        if embedding:
            raise ValueError(f"{leaf_path!r}: IA3 on an embedding table has no PEFT form (PEFT's IA3 adapts Linear layers)")
        meta = node.meta[adapter]
        l = getattr(node.states[adapter], "l", None)
        if l is None:
            raise ValueError(f"{leaf_path!r}: adapter {adapter!r} is an 'ia3' adapter with no scale vector l; pass "
                             f"the full adapted tree (jlora.combine(trainable, frozen))")
        l = np.asarray(l)
        n = n_in if meta.feedforward else n_out
        if l.size != math.prod(stack) * n:
            raise ValueError(f"{leaf_path!r}: IA3 scales of shape {l.shape}, expected stack + "
                             f"{'inputs' if meta.feedforward else 'outputs'} ({math.prod(stack) * n} values)")
        tensors = {"ia3_l": l.reshape(stack + ((1, n) if meta.feedforward else (n, 1)))}
        return tensors, 0, [{"feedforward": bool(meta.feedforward)}] * (stack[0] if stack else 1)

    def differs_on_bias(self, meta):
        return not meta.feedforward

    def bias_warning(self, modules, saving):
        shown = f"{modules[:3]}{' ...' if len(modules) > 3 else ''}"
        if saving:
            return (f"save_peft: IA3 scales the outputs of {shown}, which have a bias; PEFT's IA3 also scales the "
                    f"bias (y = (x W + b) * l), jlora does not (y = (x W) * l + b), so the PEFT model's outputs "
                    f"differ by b * (l - 1)")
        return (f"PEFT's IA3 scales the outputs of {shown} including their bias (y = (x W + b) * l); jlora's IA3 "
                f"leaves the bias unscaled (y = (x W) * l + b), so outputs differ by b * (l - 1)")

    def config(self, modules, ctx):
        names = list(modules)
        ff = {m: bool(modules[m].info.get("feedforward")) for m in names}
        on = sorted(m for m in names if ff[m])
        # feedforward_modules: the feed-forward modules' suffixes when PEFT's (dot-less) suffix test
        # then picks exactly them, else an exact regex (a str skips PEFT's subset-of-targets check)
        feedforward = sorted({peft_format.suffix(m) for m in on})
        if isinstance(ctx.target_modules, str) or any(feedforward_match(feedforward, m) != ff[m] for m in names):
            feedforward = "|".join(re.escape(m) for m in on) if on else []
        return {
            "auto_mapping": None,
            **ctx.provenance,                                # base_model_name_or_path, revision
            "exclude_modules": None,
            "fan_in_fan_out": False,
            "feedforward_modules": feedforward,
            "inference_mode": True,
            "init_ia3_weights": True,
            "modules_to_save": ctx.modules_to_save or None,
            "peft_type": "IA3",
            "target_modules": ctx.target_modules,
            "task_type": ctx.task_type,
        }

    def reads(self, config):
        return str(config.get("peft_type")).upper() == "IA3"

    def check_config(self, config, file):
        ff = config.get("feedforward_modules")
        if ff is not None and not isinstance(ff, (str, list)):
            raise PeftFormatError(f"{file}: feedforward_modules must be a list of names or a regex string, got {ff!r}")

    def parse(self, key, value, modules, weights_file):
        m = re.fullmatch(r"(.+)\.ia3_l", key)
        if m:
            modules[m.group(1)]["L"] = value
            return True
        if re.search(r"\.(lora_[A-Za-z_]+|ia3_[A-Za-z_]+)\b", key):
            raise PeftFormatError(f"{weights_file}: unrecognised tensor {key!r} in an IA3 adapter (expected "
                                  f"<module>.ia3_l)")
        return False

    def build(self, target):
        leaf_path, shape, stacked, names, parts = target.leaf_path, target.shape, target.stacked, target.names, target.parts
        weights_file, layout = target.weights_file, target.layout
        rest = shape[1:] if stacked else shape
        ff = {n: feedforward_match(target.config.get("feedforward_modules"), n) for n in names}
        if len(set(ff.values())) > 1:
            raise PeftFormatError(f"{weights_file}: feedforward_modules {target.config.get('feedforward_modules')!r} "
                                  f"marks some layers of {leaf_path!r} as feed-forward and others not "
                                  f"({names[0]!r}: {ff[names[0]]})")
        feedforward = ff[names[0]]
        first = parts[names[0]]["L"]
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
            l = parts[n]["L"]
            if tuple(l.shape) != expected:
                raise PeftFormatError(f"{weights_file}: shape mismatch for module {n!r} (params {leaf_path!r} {shape}, "
                                      f"layout {layout}, {'feed-forward' if feedforward else 'not feed-forward'}): "
                                      f"expected ia3_l {expected}, found {tuple(l.shape)}")
            scales.append(l.reshape(inputs if feedforward else outputs))
        state = IA3State(jnp.asarray(peft_format.stack_layers(scales, stacked)))
        meta = AdapterMeta(method="ia3", rank=0, scale=1.0, dropout=0.0, init="peft", feedforward=bool(feedforward))
        return peft_format.attach(target.leaf, leaf_path, layout, target.adapter, meta, state)


peft_format.register_peft_codec("ia3", IA3Codec())
