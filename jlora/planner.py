"""Will it fit? A LoRA-, QLoRA- and mesh-aware memory planner for jlora's training step.

:func:`estimate` answers "how much memory does one device need to train this model with this
method, batch, sequence length, remat and mesh", in two ways side by side:

* **analytic** (no compile, no weights materialised, any mesh size): the step's arguments exactly
  (frozen weights with QLoRA's codes and scales, adapter factors, optimizer state, batch; each
  leaf's per-device share under the mesh's partition rules), the activations the backward pass
  keeps exactly as JAX's autodiff saves them (``saved_residuals`` of the model's loss at the
  per-device batch: stacked layer inputs under remat, every layer's intermediates without), and
  the step's transient working set from a small model of what XLA holds at the step's peak:
  gradients and update temporaries, then the larger of the loss over the logits (float32 copies
  of the ``(tokens, vocab)`` logits) and one layer's backward (its intermediates recomputed under
  remat, its inputs' cotangents). The working-set coefficients were read off XLA's memory analysis
  of jlora's own Llama step (``benchmarks/estimate_memory.py`` redoes that comparison).
* **compiled** (``compile=True``): the real jlora training step (the CLI's loss, ``make_step``, the
  mesh and rules) lowered and compiled on abstract inputs (``jax.ShapeDtypeStruct``), and
  ``memory_analysis()`` read back. It needs the mesh's devices (fake CPU devices will do:
  ``XLA_FLAGS=--xla_force_host_platform_device_count=N``).

:func:`plan` turns an estimate into an answer for named hardware (:data:`HARDWARE`): fits or not
with the headroom, the largest batch and sequence length that fit, and what to change when it does
not (remat, QLoRA, bfloat16 weights, FSDP over more devices, a smaller batch with accumulation).

Example::

    est = jlora.estimate("llama-3.1-8b", jlora.QLoRA(rank=16, targets=...), batch=4, seq=2048)
    print(est.table())
    print(jlora.planner.plan(est, "rtx4090").report())

The model is jlora's Llama (Llama / Mistral / Qwen2 configs), with ``scan_layers`` (one compiled
layer, as every realistically sized run uses) and the attention the config names.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import pathlib
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AbstractMesh, Mesh

from jlora import assets
from jlora.core import _compat
from jlora.core.api import apply, combine, partition
from jlora.core.lift import lift
from jlora.core.spec import AdapterSpec
from jlora.distributed import sharding as shd
from jlora.distributed.rules import resolve_rules
from jlora.methods.dora import DoRA, QDoRA
from jlora.methods.lora import LoRA
from jlora.methods.qlora import QLoRA
from jlora.models import llama
from jlora.train.losses import check_loss_chunk
from jlora.train.step import make_step

__all__ = ["estimate", "plan", "Estimate", "Verdict", "Hardware", "HARDWARE", "SHAPES", "hardware", "model_config",
           "rule_of_thumb", "ALL_LINEAR"]

GiB = 2 ** 30
MiB = 2 ** 20

#: LoRA on all seven projections of a Llama layer (the usual QLoRA / "all-linear" setting)
ALL_LINEAR = llama.DEFAULT_TARGETS["all-linear"]

# ---------------------------------------------------------------------------------------------
# hardware


@dataclasses.dataclass(frozen=True)
class Hardware:
    """One kind of accelerator: ``memory`` bytes per device, ``devices`` of them (a TPU slice
    ``v5e-8`` has 8 chips). ``usable`` is what a training step may take: the memory less what the
    runtime keeps (CUDA context, cuBLAS / cuDNN workspaces; the TPU runtime's share) and room for
    fragmentation."""

    name: str
    description: str
    memory: int
    devices: int = 1
    kind: str = "gpu"
    usable_fraction: float = 0.92

    @property
    def usable(self) -> int:
        return int(self.memory * self.usable_fraction)

    def with_devices(self, n: int) -> "Hardware":
        return dataclasses.replace(self, devices=int(n))


def _gpu(name, description, mib):
    return Hardware(name, description, mib * MiB, 1, "gpu", 0.92)


def _tpu(name, description, gib, chips):
    return Hardware(name, description, gib * GiB, chips, "tpu", 0.95)


#: per-device memory as the driver reports it (nvidia-smi's total) or the TPU chip's HBM
HARDWARE = {h.name: h for h in (
    _gpu("rtx3090", "NVIDIA GeForce RTX 3090 (24 GB)", 24576),
    _gpu("rtx4090", "NVIDIA GeForce RTX 4090 (24 GB)", 24564),
    _gpu("a10g", "NVIDIA A10G (24 GB)", 23028),
    _gpu("l4", "NVIDIA L4 (24 GB)", 23034),
    _gpu("l40s", "NVIDIA L40S (48 GB)", 46068),
    _gpu("a100-40g", "NVIDIA A100 40 GB", 40960),
    _gpu("a100-80g", "NVIDIA A100 80 GB", 81920),
    _gpu("h100-80g", "NVIDIA H100 80 GB", 81559),
    _gpu("h200", "NVIDIA H200 (141 GB)", 143771),
    _tpu("v4", "TPU v4 chip (32 GiB HBM)", 32, 1),
    _tpu("v5e", "TPU v5e chip (16 GiB HBM)", 16, 1),
    _tpu("v5p", "TPU v5p chip (95 GiB HBM)", 95, 1),
    _tpu("v6e", "TPU v6e chip (32 GiB HBM)", 32, 1),
)}

#: TPU generations whose slice names count TensorCores (two per chip) rather than chips
_CORES_PER_CHIP = {"v4": 2, "v5p": 2, "v5e": 1, "v6e": 1}


def hardware(name: str | Hardware, devices: int | None = None) -> Hardware:
    """A :class:`Hardware` by name: a key of :data:`HARDWARE` (``h100-80g``, ``rtx4090``, ``v5e``,
    ...), a TPU slice (``v5e-8``: 8 chips; ``v4-16`` / ``v5p-16``: 8 chips, as Cloud TPU counts
    cores for those), or a GPU with a count (``h100-80g:8``). ``devices`` overrides the count."""
    if isinstance(name, Hardware):
        return name if devices is None else name.with_devices(devices)
    if not isinstance(name, str):
        raise TypeError(f"hardware must be a name such as 'h100-80g' or 'v5e-8', got {name!r}")
    key, count = name.strip().lower(), None
    if ":" in key:
        key, _, n = key.partition(":")
        count = _positive(n, f"hardware {name!r}: the count after ':'")
    elif key not in HARDWARE and "-" in key and key.rsplit("-", 1)[0] in _CORES_PER_CHIP:
        key, n = key.rsplit("-", 1)
        cores = _positive(n, f"hardware {name!r}: the slice size after '-'")
        per_chip = _CORES_PER_CHIP[key]
        if cores % per_chip:
            raise ValueError(f"hardware {name!r}: a {key} slice counts {per_chip} cores per chip; {cores} is not a "
                             f"multiple of {per_chip}")
        count = cores // per_chip
    if key not in HARDWARE:
        raise ValueError(f"unknown hardware {name!r}; known: {', '.join(HARDWARE)} (a TPU slice as 'v5e-8', "
                         f"several GPUs as 'h100-80g:8')")
    hw = HARDWARE[key]
    n = devices if devices is not None else count
    return hw if n is None else hw.with_devices(_positive(n, "devices"))


_hardware = hardware   # plan()'s argument is called hardware too


def _positive(value, what) -> int:
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a positive integer, got {value!r}") from None
    if n < 1 or str(value).strip() not in (str(n), f"+{n}") and not isinstance(value, int):
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return n


# ---------------------------------------------------------------------------------------------
# model shapes

#: public configs of common Llama-family models (only the shapes: no weights are read)
SHAPES = {
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                         max_position_embeddings=8192),
    "llama-3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True,
                         max_position_embeddings=131072),
    "llama-3.2-3b": dict(vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                         num_attention_heads=24, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
                         max_position_embeddings=131072),
    "llama-3.1-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072),
    "llama-3.1-70b": dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                          num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=131072),
    "mistral-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768),
    "qwen2.5-7b": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, attention_bias=True, attention_out_bias=False,
                       max_position_embeddings=32768),
}


def model_config(model) -> tuple[str, llama.LlamaConfig]:
    """``(name, LlamaConfig)`` for a :class:`~jlora.models.llama.LlamaConfig`, a name in
    :data:`SHAPES`, ``"smollm2"`` (the bundled model's own config), a Hugging Face directory (its
    ``config.json`` only: no weights are read) or a ``.gguf`` file (its metadata)."""
    if isinstance(model, llama.LlamaConfig):
        return "custom", model
    if not isinstance(model, (str, pathlib.Path)):
        raise TypeError(f"model must be a LlamaConfig, a name in {sorted(SHAPES)}, 'smollm2', a Hugging Face "
                        f"directory or a .gguf file; got {type(model).__name__}")
    name = str(model)
    if name in SHAPES:
        return name, llama.LlamaConfig(**SHAPES[name])
    if name == "smollm2":
        return name, _gguf_config(assets.ensure("smollm2") / llama.SMOLLM2_GGUF)
    path = pathlib.Path(name)
    if path.suffix == ".gguf" and path.is_file():
        return path.name, _gguf_config(path)
    if path.is_dir() or path.name == "config.json":
        return path.name if path.is_dir() else path.parent.name, llama.LlamaConfig.from_hf(path)
    raise ValueError(f"model {name!r} is not a known shape ({', '.join(SHAPES)}), 'smollm2', a Hugging Face directory "
                     f"with config.json, or a .gguf file")


def _gguf_config(path) -> llama.LlamaConfig:
    from gguf import GGUFReader   # the models extra

    return llama.LlamaConfig.from_gguf_metadata(GGUFReader(str(path)))


# ---------------------------------------------------------------------------------------------
# the estimate

#: optimizers by the CLI's names (the learning rate does not change the memory)
OPTIMIZERS: dict[str, Callable[[], optax.GradientTransformation]] = {
    "adamw": lambda: optax.adamw(1e-4),
    "adafactor": lambda: optax.adafactor(1e-3),
    "sgd": lambda: optax.sgd(1e-3),
    "lion": lambda: optax.lion(1e-4),
}

#: The step's transient working set beyond the saved activations, per device, in multiples of
#: sizes the analytic model knows. Read off XLA's memory analysis of jlora's Llama step (least-
#: squares fits: 115 points of Llama shapes, methods, batches, sequence lengths, remat and meshes;
#: then the loss and layer terms refitted on 145 points with the model's own, optionally chunked,
#: loss, 135M to 70B: 86 % of them within 10 %, mean 4.3 %);
#: ``benchmarks/estimate_memory.py`` checks them on points the fits did not see.
#:
#: * ``grads``: bytes per trainable byte (the gradients and the optimizer's update temporaries);
#: * ``layer_weights``: one layer's frozen weights in the compute dtype, sliced out of the stack
#:   (``layer_weights_fsdp`` when FSDP gathers them; a quantised base is gathered as codes and
#:   dequantised one kernel at a time instead, see ``dequantised``);
#: * ``head_gather``: the vocabulary matrix (lm_head or tied embedding), gathered whole for the
#:   logits when FSDP splits it;
#: * ``logits``: float32 (tokens, vocab) logits live at the loss's peak on top of the saved
#:   activations, which already hold one copy (the cotangent, the softmax; ``logits_no_remat`` when
#:   every layer's activations are kept). With ``loss_chunk`` the logits are one chunk's
#:   (``logits_chunk``, ``logits_chunk_no_remat``), and under FSDP the chunk loop keeps
#:   ``head_chunk`` gathered copies of the vocabulary matrix;
#: * ``layer``: one layer's intermediates, recomputed in its backward under remat, at which point
#:   ``logits_freed`` float32 logits of the loss are gone again (``layer_chunk`` with a chunked
#:   loss, whose logits are never whole);
#: * ``dequantised``: QLoRA's largest kernel dequantised to the compute dtype, with its unpacking
#:   temporaries, in a layer's backward;
#: * ``tied_gather``: a tied embedding under FSDP, gathered for the lookup and for the head at once
#:   (a third phase, on top of the arguments; it decides the peak of short sequences).
WORKSPACE = {
    "grads": 2.5,
    "layer_weights": 0.2,
    "layer_weights_fsdp": 0.6,
    "head_gather": 1.1,
    "logits": 0.92,
    "logits_no_remat": 0.5,
    "logits_chunk": 2.0,
    "logits_chunk_no_remat": 1.2,
    "head_chunk": 1.4,
    "layer": 0.98,
    "logits_freed": 1.33,
    "layer_chunk": 1.14,
    "tied_gather": 2.2,
    "dequantised": 2.0,
}


def _as_mesh(mesh):
    """None, or a Mesh / AbstractMesh for a Mesh, an AbstractMesh, ``"data=2,fsdp=4"`` or a dict."""
    if mesh is None or isinstance(mesh, (Mesh, AbstractMesh)):
        return mesh
    if isinstance(mesh, str):
        shape, names = shd.parse_mesh(mesh)
    elif isinstance(mesh, Mapping):
        names, shape = tuple(mesh), tuple(mesh.values())
        if not all(isinstance(n, str) for n in names):
            raise ValueError(f"mesh must map axis names to sizes, got {dict(mesh)!r}")
    else:
        raise TypeError(f"mesh must be a Mesh, an AbstractMesh, a string like 'data=2,fsdp=4' or a dict, got "
                        f"{type(mesh).__name__}")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in shape):
        raise ValueError(f"mesh {dict(zip(names, shape))}: an estimate needs every axis size given as a positive int "
                         f"(there are no devices to fill a -1)")
    return AbstractMesh(tuple(shape), tuple(names))


def _batch_axes(mesh) -> tuple:
    if mesh is None:
        return ()
    names = tuple(mesh.shape)
    return tuple(a for a in ("data", "fsdp") if a in names) or (names[0],)


def _nbytes(x) -> int:
    return int(np.prod(np.shape(x), dtype=np.int64)) * jnp.dtype(x.dtype).itemsize


def _device_bytes(tree, shardings=None) -> int:
    """Bytes one device holds of ``tree`` (abstract leaves) under ``shardings`` (None: everything)."""
    leaves = jax.tree_util.tree_leaves(tree)
    if shardings is None:
        return sum(_nbytes(x) for x in leaves)
    sh = jax.tree_util.tree_leaves(shardings)
    if len(sh) != len(leaves):   # pragma: no cover - shardings_for keeps the structure
        raise RuntimeError("shardings do not match the tree")
    return sum(int(np.prod(s.shard_shape(tuple(np.shape(x))), dtype=np.int64)) * jnp.dtype(x.dtype).itemsize
               for x, s in zip(leaves, sh))


def _abstract(config: llama.LlamaConfig, spec):
    """(model, trainable, frozen) with ``jax.ShapeDtypeStruct`` leaves: nothing is materialised.
    Cached on (config, spec): a plan's searches re-estimate the same model many times."""
    try:
        return _abstract_cached(config, spec)
    except TypeError:   # an unhashable spec (a user's own with a list field): build it each time
        return _abstract_cached.__wrapped__(config, spec)


@functools.lru_cache(maxsize=16)
def _abstract_cached(config: llama.LlamaConfig, spec):
    model = llama.LlamaForCausalLM(config)
    params = jax.eval_shape(model.init_params, jax.random.key(0))
    example = (jnp.zeros((1, 8), jnp.int32),)
    adapted = jax.eval_shape(lambda p, k: apply(p, spec, key=k, model=model.apply, example=example),
                             params, jax.random.key(0))
    trainable, frozen = partition(adapted)
    return model, trainable, frozen


def _loss_fn(model, chunk=None):
    """The CLI's causal-LM loss on the lifted model (every position a target), its head and loss
    ``chunk`` positions at a time when given."""
    forward = lift(model.apply)

    def loss(params, batch, key=None):
        return forward(params, batch["input_ids"], batch["labels"], method="loss", chunk=chunk)[0]

    return loss


def _residual_bytes(config: llama.LlamaConfig, spec, batch: int, seq: int, chunk: int | None = None) -> int:
    try:
        return _residual_bytes_cached(config, spec, batch, seq, chunk)
    except TypeError:   # an unhashable spec
        return _residual_bytes_cached.__wrapped__(config, spec, batch, seq, chunk)


@functools.lru_cache(maxsize=256)
def _residual_bytes_cached(config: llama.LlamaConfig, spec, batch: int, seq: int, chunk: int | None) -> int:
    """Bytes of what reverse-mode autodiff keeps from the loss's forward pass for the backward pass
    and that grows with the batch: the activations. (Inputs and frozen weights are the step's
    arguments; values made from the weights alone, such as a transposed embedding or a dequantised
    kernel, are counted with the layer weights: the compiler reads or recomputes them.) Measured as
    the difference between ``2 * batch`` and ``batch`` sequences, so it is exact for anything linear
    in the batch."""
    model, trainable, frozen = _abstract(config, spec)
    loss = _loss_fn(model, chunk)

    def saved(b):
        ids = jax.ShapeDtypeStruct((b, seq), jnp.int32)
        found = _compat.saved_residuals(lambda t, f, x: loss(combine(t, f), x), trainable, frozen,
                                        {"input_ids": ids, "labels": ids})
        return sum(_nbytes(aval) for aval, why in found if "from the argument" not in why)

    return saved(2 * batch) - saved(batch)


@dataclasses.dataclass
class Estimate:
    """Memory of one training step per device, in bytes. ``parts`` is the analytic breakdown
    (arguments, then the working set) and ``peak`` its sum; ``compiled`` the compiler's memory
    analysis when it was asked for (``argument``, ``output``, ``alias``, ``temp``, ``peak``)."""

    model: str
    method: str
    batch: int
    seq: int
    mesh: dict
    remat: bool | str
    compute_dtype: str
    param_dtype: str
    optimizer: str
    backend: str
    parts: dict
    peak: int
    per_example: dict = dataclasses.field(default_factory=dict, repr=False)
    compiled: dict | None = None
    inputs: dict = dataclasses.field(default_factory=dict, repr=False)
    notes: list = dataclasses.field(default_factory=list)
    loss_chunk: int | None = None

    @property
    def devices(self) -> int:
        return math.prod(self.mesh.values()) if self.mesh else 1

    @property
    def error(self) -> float | None:
        """(analytic - compiled) / compiled, of the peak; None without a compiled figure."""
        if not self.compiled:
            return None
        return (self.peak - self.compiled["peak"]) / self.compiled["peak"]

    def at_batch(self, batch: int) -> int:
        """The analytic peak per device at another global batch (activations scale with it; the
        batch must split into ``accum_steps`` micro-batches over the mesh's batch axes)."""
        step = self.inputs["split"] * self.inputs["accum_steps"]
        if not isinstance(batch, int) or batch < 1 or batch % step:
            raise ValueError(f"batch must be a positive multiple of {step} (accum_steps x the batch axes' devices), "
                             f"got {batch!r}")
        return _parts(self, batch)[1]

    def table(self) -> str:
        mesh = ",".join(f"{k}={v}" for k, v in self.mesh.items()) or "1 device"
        lines = [f"{self.model}  {self.method}  batch {self.batch} x {self.seq} tokens  mesh {mesh}  "
                 f"remat {'on' if self.remat is True else self.remat or 'off'}  "
                 f"{f'loss chunk {self.loss_chunk}  ' if self.loss_chunk else ''}compute {self.compute_dtype}  weights {self.param_dtype}  "
                 f"{self.optimizer}  ({self.backend})",
                 f"{'per device':44s}{'GiB':>10s}"]
        for name, value in self.parts.items():
            lines.append(f"  {name:42s}{value / GiB:10.3f}")
        lines.append(f"  {'peak (analytic)':42s}{self.peak / GiB:10.3f}")
        if self.compiled:
            lines.append(f"  {'peak (compiled, XLA memory analysis)':42s}{self.compiled['peak'] / GiB:10.3f}   "
                         f"analytic {100 * self.error:+.1f} %")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def as_dict(self) -> dict:
        out = {k: getattr(self, k) for k in ("model", "method", "batch", "seq", "mesh", "remat", "loss_chunk", "compute_dtype",
                                              "param_dtype", "optimizer", "backend", "parts", "peak", "compiled", "notes")}
        out["error"] = self.error
        return out


def _dtype_name(d) -> str:
    return jnp.dtype(d).name


def _local_config(config: llama.LlamaConfig, mesh) -> llama.LlamaConfig:
    """The share of the model one device computes under tensor parallelism (heads, MLP width and
    vocabulary split over ``tensor`` where they divide); the config itself without it."""
    tp = dict(mesh.shape).get("tensor", 1) if mesh is not None else 1
    if tp == 1:
        return config
    c = config
    if c.num_key_value_heads % tp == 0 and c.num_attention_heads % tp == 0:
        c = c.replace(num_attention_heads=c.num_attention_heads // tp, num_key_value_heads=c.num_key_value_heads // tp,
                      head_dim=c.head_dim)
    if c.intermediate_size % tp == 0:
        c = c.replace(intermediate_size=c.intermediate_size // tp)
    if c.vocab_size % tp == 0:
        c = c.replace(vocab_size=c.vocab_size // tp)
    return c


def _layer_weight_bytes(config: llama.LlamaConfig, itemsize: int) -> int:
    """One decoder layer's frozen matrices in a dtype of ``itemsize`` bytes."""
    c = config
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    n = c.hidden_size * (q + 2 * kv) + q * c.hidden_size + 3 * c.hidden_size * c.intermediate_size
    return n * itemsize


def estimate(model, spec: AdapterSpec | None = None, *, batch: int, seq: int, mesh=None, rules=None,
             remat: bool | None = None, optimizer: str | optax.GradientTransformation = "adamw",
             param_dtype=None, compute_dtype=None, accum_steps: int = 1, backend: str | None = None,
             loss_chunk: int | None = None, compile: bool = False) -> Estimate:
    """Per-device memory of one jlora training step; see the module docstring.

    Args:
      model: a :class:`~jlora.models.llama.LlamaConfig`, a name in :data:`SHAPES`, ``"smollm2"``, a
        Hugging Face directory (``config.json``) or a ``.gguf`` file.
      spec: the method (default ``jlora.LoRA(rank=16, alpha=32, targets=ALL_LINEAR)``).
      batch, seq: the global batch (sequences per step) and the sequence length.
      mesh: None (one device), a ``Mesh`` / ``AbstractMesh``, ``"data=2,fsdp=4"`` or a dict. The
        batch splits over ``data`` and ``fsdp`` (or the first axis), as ``jlora train --mesh`` does.
      rules: partition rules (default: the model's own, resolved on the mesh).
      remat: recompute each layer in the backward pass, or a policy name (default: the config's setting).
      optimizer: a name in :data:`OPTIMIZERS` or an optax transformation.
      param_dtype, compute_dtype: storage and compute dtypes (default: the config's).
      accum_steps: gradient accumulation (micro-batches of ``batch / accum_steps``).
      loss_chunk: the vocabulary head and the loss on this many positions at a time (``jlora train
        --loss-chunk``; None or 0: the whole sequence at once).
      backend: ``"gpu"``, ``"tpu"`` or ``"cpu"``, where the step will run (default: JAX's default
        backend); the figure is the same, and on ``"cpu"`` with a 16-bit compute dtype a note says
        that XLA:CPU needs far more (it multiplies bfloat16 in float32).
      compile: also lower and compile the real step on abstract inputs and read the compiler's
        memory analysis (needs the mesh's devices; see the module docstring).
    """
    name, config = model_config(model)
    for what, v in (("batch", batch), ("seq", seq), ("accum_steps", accum_steps)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{what} must be a positive int, got {v!r}")
    if batch % accum_steps:
        raise ValueError(f"batch {batch} is not divisible by accum_steps {accum_steps}")
    loss_chunk = check_loss_chunk(loss_chunk)
    if loss_chunk is not None and loss_chunk >= seq:
        loss_chunk = None   # one chunk: the same program as no chunking
    if seq > config.max_position_embeddings:
        raise ValueError(f"seq {seq} exceeds the model's max_position_embeddings ({config.max_position_embeddings})")
    changes = dict(scan_layers=True)
    if remat is not None:
        changes["remat"] = remat   # True / False or a policy name (the config checks it)
    if param_dtype is not None:
        changes["param_dtype"] = jnp.dtype(param_dtype)
    if compute_dtype is not None:
        changes["dtype"] = jnp.dtype(compute_dtype)
    config = config.replace(**changes)
    spec = LoRA(rank=16, alpha=32.0, targets=ALL_LINEAR) if spec is None else spec
    if not isinstance(spec, AdapterSpec):
        raise TypeError(f"spec must be a jlora adapter spec (jlora.LoRA, jlora.QLoRA, jlora.DoRA, ...), got {spec!r}")
    if isinstance(optimizer, str):
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer {optimizer!r} is not one of {sorted(OPTIMIZERS)} (or pass an optax transformation)")
        opt_name, optimizer = optimizer, OPTIMIZERS[optimizer]()
    else:
        opt_name = type(optimizer).__name__
    backend = (backend or jax.default_backend()).lower()
    if backend not in ("cpu", "gpu", "tpu", "cuda", "rocm"):
        raise ValueError(f"backend must be 'cpu', 'gpu' or 'tpu', got {backend!r}")
    backend = "gpu" if backend in ("cuda", "rocm") else backend

    mesh = _as_mesh(mesh)
    axes = _batch_axes(mesh)
    split = math.prod(dict(mesh.shape)[a] for a in axes) if mesh is not None else 1
    micro = batch // accum_steps
    if micro % split:
        raise ValueError(f"batch {batch} (/ accum_steps {accum_steps}) does not split over the {split} devices of mesh "
                         f"axes {axes}; use a multiple of {split * accum_steps}")
    if mesh is not None and rules is None:
        rules = resolve_rules(config.partition_rules(), mesh)

    _, trainable, frozen = _abstract(config, spec)
    opt_state = jax.eval_shape(optimizer.init, trainable)
    if mesh is not None:
        t_sh, f_sh = shd.shardings_for(trainable, mesh, rules), shd.shardings_for(frozen, mesh, rules)
        o_sh = shd.opt_state_shardings(opt_state, trainable, t_sh, mesh)
    else:
        t_sh = f_sh = o_sh = None
    t_bytes = _device_bytes(trainable, t_sh)
    per_device = batch // split             # sequences of the whole step on one device
    b_dev = micro // split                  # sequences of one micro-batch on one device

    local = _local_config(config, mesh)
    saved = _residual_bytes(local, spec, b_dev, seq, loss_chunk)
    one = _residual_bytes(local.replace(num_hidden_layers=1, remat=False), spec, b_dev, seq)
    layer = _residual_bytes(local.replace(num_hidden_layers=2, remat=False), spec, b_dev, seq) - one
    c_bytes = jnp.dtype(config.dtype).itemsize
    p_bytes = jnp.dtype(config.param_dtype).itemsize
    w = WORKSPACE
    pe = {"saved": saved / b_dev, "logits": (loss_chunk or seq) * local.vocab_size * 4, "layer": layer / b_dev}
    fixed = {
        "frozen weights": _device_bytes(frozen, f_sh),
        "adapter (trainable)": t_bytes,
        "optimizer state": _device_bytes(opt_state, o_sh),
        "gradients and update": int(w["grads"] * t_bytes) + (t_bytes if accum_steps > 1 else 0),
    }
    if not isinstance(spec, QLoRA):
        coef = w["layer_weights_fsdp"] if _fsdp(mesh) > 1 else w["layer_weights"]
        fixed["one layer's weights, compute dtype"] = int(coef * _layer_weight_bytes(local, c_bytes))
    largest = max(local.hidden_size * local.intermediate_size, local.hidden_size * local.num_attention_heads * local.head_dim)
    dequantised = int(w["dequantised"] * largest * c_bytes) if isinstance(spec, QLoRA) else 0
    head = local.vocab_size * config.hidden_size * p_bytes if _fsdp(mesh) > 1 else 0
    if head:
        fixed["vocabulary matrix gathered (FSDP)"] = int(w["head_gather"] * head)
    est = Estimate(model=name, method=_method_name(spec), batch=batch, seq=seq,
                   mesh=dict(mesh.shape) if mesh is not None else {}, remat=config.remat,
                   compute_dtype=_dtype_name(config.dtype), param_dtype=_dtype_name(config.param_dtype),
                   optimizer=opt_name, backend=backend, parts={}, peak=0, per_example=pe, loss_chunk=loss_chunk,
                   inputs=dict(fixed=fixed, accum_steps=accum_steps, split=split, per_device=per_device,
                               dequantised=dequantised, head_fsdp=head, tied=bool(config.tie_word_embeddings)))
    est.parts, est.peak = _parts(est, batch)
    if backend == "cpu" and c_bytes < 4:
        est.notes.append("XLA:CPU has no bfloat16 matmul: it multiplies in float32 and keeps float32 copies of the "
                         "operands (the stacked frozen weights among them), so a CPU compile of this step needs far "
                         "more than this estimate, which follows GPUs and TPUs")
    if compile:
        est.compiled = _compile(config, spec, optimizer, batch, seq, mesh, rules, axes, accum_steps, loss_chunk)
    return est


def _fsdp(mesh) -> int:
    return dict(mesh.shape).get("fsdp", 1) if mesh is not None else 1


def _method_name(spec) -> str:
    name = type(spec).__name__
    rank = getattr(spec, "rank", None)
    quant = getattr(spec, "quant", None)
    return name + (f" r={rank}" if rank is not None else "") + (f" {quant}" if quant else "")


def _parts(est: Estimate, batch: int) -> tuple[dict, int]:
    """The breakdown and its sum at global ``batch``."""
    fixed, inp, pe, w = est.inputs["fixed"], est.inputs, est.per_example, WORKSPACE
    b_dev = batch // inp["accum_steps"] // inp["split"]
    parts = dict(fixed)
    parts["batch"] = 2 * (batch // inp["split"]) * est.seq * 4
    parts["saved activations"] = int(pe["saved"] * b_dev)
    if est.loss_chunk:   # one chunk's logits at a time
        loss = int(w["logits_chunk" if est.remat else "logits_chunk_no_remat"] * pe["logits"] * b_dev
                   + w["head_chunk"] * inp["head_fsdp"])
    else:
        loss = int(w["logits" if est.remat else "logits_no_remat"] * pe["logits"] * b_dev)
    layer = int((w["layer_chunk" if est.loss_chunk else "layer"] * pe["layer"] if est.remat else 0) * b_dev)
    if not est.loss_chunk:
        layer -= int(w["logits_freed"] * pe["logits"] * b_dev)
    layer += inp["dequantised"]
    phases = {"peak phase: loss over the logits": loss, "peak phase: one layer's backward": layer}
    if inp.get("tied") and inp.get("head_fsdp"):
        tied = int((w["tied_gather"] - w["head_gather"]) * inp["head_fsdp"]) - parts["saved activations"]
        phases["peak phase: the tied embedding gathered twice"] = tied
    name = max(phases, key=phases.get)
    parts[name] = phases[name]
    return parts, sum(parts.values())



def _devices_for(n: int) -> list:
    """``n`` devices to compile on: the default backend's, else CPU devices (fake ones count)."""
    devices = jax.devices()
    if len(devices) >= n:
        return devices[:n]
    cpu = jax.devices("cpu")
    if len(cpu) >= n:
        return cpu[:n]
    raise ValueError(f"compiling for a mesh of {n} devices needs {n} devices; this process has {len(devices)} "
                     f"{devices[0].platform} and {len(cpu)} CPU device(s). Set XLA_FLAGS="
                     f"--xla_force_host_platform_device_count={n} before JAX starts (jlora estimate does), or leave "
                     f"out compile=True for the analytic figure alone")


def _compile(config, spec, optimizer, batch, seq, mesh, rules, axes, accum_steps, loss_chunk=None) -> dict:
    """The compiler's memory analysis of the real step (``jlora.train.make_step`` with the CLI's
    loss) on abstract inputs, per device."""
    model, trainable, frozen = _abstract(config, spec)
    real = None
    if mesh is not None:
        shape, names = tuple(dict(mesh.shape).values()), tuple(mesh.shape)
        real = shd.make_mesh(shape, names, devices=_devices_for(math.prod(shape)))
        rules = resolve_rules(config.partition_rules(), real) if rules is None else rules
    step = make_step(_loss_fn(model, loss_chunk), optimizer, mesh=real, rules=rules if real is not None else None,
                     batch_axes=axes or ("data",), accum_steps=accum_steps)
    opt_state = jax.eval_shape(optimizer.init, trainable)
    ids = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    return step.memory(trainable, frozen, opt_state, {"input_ids": ids, "labels": ids})


# ---------------------------------------------------------------------------------------------
# the answer for named hardware


def rule_of_thumb(est: Estimate) -> int:
    """The field's rule, per device: (weights + optimizer state + gradients) x 1.3, the 30 % standing
    for activations; weights, optimizer and gradients split evenly over the devices."""
    p = est.parts
    static = p["frozen weights"] + p["adapter (trainable)"] + p["optimizer state"] + p["adapter (trainable)"]
    return int(1.3 * static)


@dataclasses.dataclass
class Verdict:
    """:func:`plan`'s answer: ``fits`` on ``hardware`` (peak per device within ``hardware.usable``),
    the ``headroom`` in bytes (negative: the shortfall), the largest global batch and sequence length
    that fit with everything else kept, and ``suggestions``: ``(change, Estimate)`` pairs that fit."""

    hardware: Hardware
    estimate: Estimate
    fits: bool
    headroom: int
    largest_batch: int
    largest_seq: int | None
    suggestions: list

    def report(self) -> str:
        e, hw = self.estimate, self.hardware
        lines = [e.table(), ""]
        where = f"{hw.devices} x {hw.description}" if hw.devices > 1 else hw.description
        verdict = "fits" if self.fits else "does NOT fit"
        lines.append(f"{where}: {hw.memory / GiB:.1f} GiB per device, {hw.usable / GiB:.1f} GiB usable -> {verdict} "
                     f"({'headroom' if self.fits else 'short by'} {abs(self.headroom) / GiB:.2f} GiB per device)")
        line = f"largest batch that fits: {self.largest_batch or 'none'} x {e.seq} tokens"
        if self.largest_seq is not None:
            line += f"; largest sequence length at batch {e.batch}: {self.largest_seq or 'none'} tokens"
        lines.append(line)
        if self.suggestions:
            lines.append("changes that fit:" if not self.fits else "other settings:")
            for change, alt in self.suggestions:
                lines.append(f"  - {change}: {alt.peak / GiB:.2f} GiB per device")
        elif not self.fits:
            lines.append("nothing tried fits (remat, QLoRA, bfloat16 weights, FSDP over up to 256 devices, batch 1)")
        if hw.kind == "gpu":
            lines.append("(JAX takes 75 % of a GPU by default: run with XLA_PYTHON_CLIENT_MEM_FRACTION=0.95)")
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return {"hardware": dataclasses.asdict(self.hardware), "estimate": self.estimate.as_dict(), "fits": self.fits,
                "headroom": self.headroom, "largest_batch": self.largest_batch, "largest_seq": self.largest_seq,
                "suggestions": [{"change": c, "peak": a.peak} for c, a in self.suggestions]}


def _quantized(spec):
    """The QLoRA / QDoRA counterpart of a LoRA / DoRA spec (same rank, alpha, targets, ...), or None."""
    if isinstance(spec, QLoRA) or type(spec) not in (LoRA, DoRA):
        return None
    target = QDoRA if isinstance(spec, DoRA) else QLoRA
    fields = {f.name for f in dataclasses.fields(target) if f.init}
    kw = {}
    for f in dataclasses.fields(spec):
        if f.init and f.name in fields:
            value = getattr(spec, f.name)
            kw[f.name] = None if value == () and f.default is None else value   # normalised empty patterns
    return target(**kw)


def plan(model, spec: AdapterSpec | None = None, *, hardware: str | Hardware, batch: int, seq: int, mesh=None,
         suggest: bool = True, search_seq: bool = True, compile: bool = False, **kwargs) -> Verdict:
    """Will ``model`` train with ``spec`` at ``batch`` x ``seq`` on ``hardware``? The estimate is for
    the hardware's compiler (``backend``) and, on several devices with no ``mesh``, FSDP over all of
    them (``fsdp=N``). ``kwargs`` go to :func:`estimate` (remat, param_dtype, optimizer, ...).
    ``suggest`` / ``search_seq``: look for changes that fit / the longest sequence that fits (each
    costs a few more estimates; ``largest_seq`` is None without the search, 0 when nothing fits).
    ``compile``: the verdict's own estimate also carries the compiler's figure (the searches stay
    analytic).

    Example::

        v = plan("llama-3.1-8b", jlora.QLoRA(rank=16, targets=ALL_LINEAR), hardware="rtx4090", batch=4, seq=2048)
        print(v.report())
    """
    hw = _hardware(hardware)
    kwargs.setdefault("backend", hw.kind)
    if mesh is None and hw.devices > 1:
        mesh = {"fsdp": hw.devices}
    base = dict(kwargs, mesh=mesh, batch=batch, seq=seq)
    est = estimate(model, spec, compile=compile, **base)
    if est.devices != hw.devices:
        raise ValueError(f"mesh {est.mesh} has {est.devices} devices but hardware {hw.name!r} has {hw.devices}")
    usable = hw.usable
    step = est.inputs["split"] * est.inputs["accum_steps"]
    largest_batch = 0
    b = step
    while b <= 1 << 16 and est.at_batch(b) <= usable:
        largest_batch = b
        b *= 2
    if largest_batch:   # refine between the last fitting power of two and the next
        lo, hi = largest_batch, min(2 * largest_batch, 1 << 17)
        while hi - lo > step:
            mid = (lo + hi) // 2 // step * step
            if mid <= lo:
                break
            lo, hi = (mid, hi) if est.at_batch(mid) <= usable else (lo, mid)
        largest_batch = lo
    largest_seq = _largest_seq(model, spec, base, usable) if search_seq else None
    suggestions = _suggestions(model, spec, est, base, usable, hw) if suggest else []
    return Verdict(hw, est, est.peak <= usable, usable - est.peak, largest_batch, largest_seq, suggestions)


def _largest_seq(model, spec, base, usable) -> int:
    """The longest multiple of 128 tokens (up to 128k) that fits at the given batch."""
    def fits(s):
        try:
            return estimate(model, spec, **dict(base, seq=s)).peak <= usable
        except ValueError:   # longer than the model's positions
            return False

    if not fits(128):
        return 0
    lo, hi = 128, 256
    while hi <= 131072 and fits(hi):
        lo, hi = hi, hi * 2
    if hi > 131072:
        return lo
    while hi - lo > 128:
        mid = (lo + hi) // 2 // 128 * 128
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def _suggestions(model, spec, est, base, usable, hw) -> list:
    out = []

    def attempt(change, **over):
        try:
            alt = estimate(model, over.pop("spec", spec), **dict(base, **over))
        except ValueError:
            return None
        if alt.peak <= usable:
            out.append((change, alt))
        return alt

    if not est.remat:
        attempt("turn remat on (--remat)", remat=True)
    chunk = 512 if base["seq"] >= 1024 else 128
    if not est.loss_chunk and base["seq"] > chunk:
        attempt(f"the loss {chunk} positions at a time (--loss-chunk {chunk}): no full float32 logits",
                loss_chunk=chunk)
    q = _quantized(spec if spec is not None else LoRA(rank=16, alpha=32.0, targets=ALL_LINEAR))
    if q is not None:
        attempt(f"{type(q).__name__} instead ({q.quant} frozen base, --method qlora)", spec=q)
    if est.param_dtype == "float32":
        attempt("bfloat16 weights and compute (--param-dtype bfloat16 --dtype bfloat16)",
                param_dtype="bfloat16", compute_dtype="bfloat16")
    if est.peak > usable:
        n = hw.devices * 2
        while n <= 256:
            batch = max(base["batch"], n)
            alt = attempt(f"FSDP over {n} devices (--mesh fsdp={n}, global batch {batch})",
                          mesh={"fsdp": n}, batch=batch)
            if alt is not None and alt.peak <= usable:
                break
            n *= 2
        split, batch = est.inputs["split"], base["batch"]
        micro = [m for m in range(split, batch, split) if batch % m == 0 and est.at_batch(m) <= usable]
        if micro:   # the same effective batch in micro-batches that fit
            m = max(micro)
            attempt(f"micro-batches of {m} (--accum-steps {batch // m}, the same effective batch {batch})",
                    accum_steps=batch // m)
    return out
