"""The prompt family: prompt tuning, prefix tuning (P-tuning v2 / Li & Liang) and P-tuning v1.

These methods add no adapter to any weight: the base model is frozen and a small set of new
parameters produces either virtual-token embeddings put in front of the input, or per-layer
key/value prefixes every token attends to. They need the model's cooperation through a small
protocol, which :mod:`jlora.models.bert` and :mod:`jlora.models.llama` implement.

Example::

    spec = jlora.PromptTuning(num_virtual_tokens=20, init="vocab")
    adapted = jlora.apply_prompt(params, spec, key, config=model.config)   # + a "jlora_prompt" entry
    trainable, frozen = jlora.partition(adapted)                         # only the prompt trains
    forward = jlora.lift(model.apply)

    def loss_fn(params, batch, key):
        kw = jlora.prompt_kwargs(params, batch["input_ids"].shape[0])   # {"prompt_embeddings": (B, P, D)}
        logits = forward(params, batch["input_ids"], batch["attention_mask"], **kw)
        ...

**Where the parameters live.** :func:`apply_prompt` adds one top-level entry, ``"jlora_prompt"``,
next to ``"params"``; its leaves are :class:`jlora.Trainable`, so :func:`jlora.partition`,
:func:`jlora.combine`, :func:`jlora.train.make_step`, :func:`jlora.summary` and the Orbax
checkpoints handle them like any trained leaf. A Linen ``model.apply`` ignores the extra
collection. The entry describes itself, so :func:`prompt_kwargs` needs no spec::

    jlora_prompt/prompt_tuning/embedding          (P, hidden)
    jlora_prompt/p_tuning/embedding               (P, hidden)   + mlp_head/{0,2,4} or lstm_head + mlp_head/{0,2}
    jlora_prompt/prefix_tuning/embedding          (P, L, 2, kv_heads, head_dim)          (deep prompts / exported)
    jlora_prompt/prefix_tuning/embedding          (P, kv_heads*head_dim) + transform/{0,2}   (Li & Liang MLP)

The ``(P, L, 2, kv_heads, head_dim)`` prefix is PEFT's ``Embedding(P, 2*L*token_dim)`` weight
reshaped (row-major, so the same bytes); ``[:, l, 0]`` is layer ``l``'s keys, ``[:, l, 1]`` its values.

**The model protocol.** A model takes either or both keyword arguments:

* ``prompt_embeddings``: ``(B, P, hidden)``, put in front of the token embeddings. The attention
  mask gets ``P`` ones in front and positions run over the whole ``P + T`` sequence (PEFT); the
  outputs cover ``P + T`` positions, so a language-model loss pads its labels with ``P`` ignored
  entries in front (:func:`pad_labels`).
* ``prefix``: ``{"k": (L, B, P, kv_heads, head_dim), "v": same}``: layer ``l`` attends to
  ``concat(prefix["k"][l], keys)`` / ``concat(prefix["v"][l], values)`` along the sequence axis,
  every query may see every prefix slot, and the real tokens' positions start at ``P``. The
  prefix keys are used as given (no rotary embedding is applied to them, like Hugging Face cache
  entries). With a KV cache the prefix is simply the cache's first ``P`` slots.

Unlike PEFT, prefixes work with gradient checkpointing (``remat``) and scanned layers: the prefix
is an ordinary (scanned) input of each layer, not a cache object mutated in place.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jlora.core import api as _api
from jlora.core.nodes import Trainable, is_adapter_leaf, unwrap
from jlora.core.paths import flatten_with_paths, matches
from jlora.core.spec import CliField, CliMethod

PROMPT_KEY = "jlora_prompt"
IGNORE_INDEX = -100
PROMPT_INITS = ("random", "vocab", "text")
PTUNING_ENCODERS = ("mlp", "lstm")
KINDS = ("prompt_tuning", "prefix_tuning", "p_tuning")
#: default pattern for the token embedding table ``init="vocab" | "text"`` copies rows from
DEFAULT_EMBEDDING = r".*/(word_embeddings|embed_tokens|wte|tok_embeddings|embed_in)/(embedding|weight)"


def _positive_int(value, owner: str, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{owner}.{name} must be a positive int, got {value!r}")
    return int(value)


_VIRTUAL_TOKENS = CliField("virtual_tokens", 20, "prompt/prefix/ptuning: number of virtual tokens", "positive_int")
_INIT_TEXT = CliField("prompt_init_text", None, "prompt: the text for --prompt-init text (also --prefix-init text)")


class _PromptSpec(CliMethod):
    method = "prompt"
    kind = "prompt_tuning"

    def to_json(self) -> dict:
        """A JSON-serialisable description (stored by :func:`jlora.io.save_adapter`)."""
        return {"method": self.method, **dataclasses.asdict(self)}


@dataclasses.dataclass(frozen=True)
class PromptTuning(_PromptSpec):
    """Prompt tuning (Lester et al. 2021; PEFT ``PromptEmbedding``): ``num_virtual_tokens`` trainable
    embeddings put in front of the input embeddings.

    Example::

        spec = jlora.PromptTuning(20, init="text", init_text="Classify if the review is positive:")
        adapted = jlora.apply_prompt(params, spec, key, config=model.config, tokenizer=tok)

    Args:
      num_virtual_tokens: number of virtual tokens P (> 0).
      init: ``"random"`` (N(0, 1), PEFT's default), ``"vocab"`` (rows of the model's token
        embedding table at uniformly drawn token ids, PEFT's ``SAMPLE_VOCAB``) or ``"text"``
        (the embeddings of ``init_text``'s tokens, truncated or repeated to P, PEFT's ``TEXT``;
        tokenised as PEFT does, special tokens included).
      init_text: the text for ``init="text"``.
      embedding: regex of the token embedding table's path, for ``"vocab"`` / ``"text"``
        (default: a leaf named ``word_embeddings`` / ``embed_tokens`` / ``wte`` ...).
    """

    num_virtual_tokens: int = 20
    init: str = "random"
    init_text: str | None = None
    embedding: str = DEFAULT_EMBEDDING

    method = "prompt_tuning"
    kind = "prompt_tuning"


    cli_method = "prompt"
    cli_fields = (_VIRTUAL_TOKENS,
                  CliField("prompt_init", "random", "prompt: initialisation", "choice", ("random", "vocab", "text")),
                  _INIT_TEXT)

    @classmethod
    def from_cli(cls, settings, common, context):
        return cls(settings["virtual_tokens"], init=settings["prompt_init"], init_text=settings["prompt_init_text"])
    def __post_init__(self):
        object.__setattr__(self, "num_virtual_tokens",
                           _positive_int(self.num_virtual_tokens, "PromptTuning", "num_virtual_tokens"))
        if self.init not in PROMPT_INITS:
            raise ValueError(f"PromptTuning.init must be one of {PROMPT_INITS}, got {self.init!r}")
        if self.init == "text" and (not isinstance(self.init_text, str) or not self.init_text.strip()):
            raise ValueError(f"PromptTuning(init='text') needs a non-empty init_text, got {self.init_text!r}")
        if self.init != "text" and self.init_text is not None:
            raise ValueError(f"PromptTuning.init_text is only used with init='text' (init={self.init!r})")


@dataclasses.dataclass(frozen=True)
class PrefixTuning(_PromptSpec):
    """Prefix tuning: trainable per-layer keys and values that every token attends to.

    ``projection_hidden=None`` is P-tuning v2's deep prompts (PEFT's default
    ``prefix_projection=False``): the ``(P, L, 2, kv_heads, head_dim)`` keys/values are the parameters.
    An int is Li & Liang's reparameterisation, ``Embedding(P, kv_dim) -> Linear(kv_dim, H) -> tanh ->
    Linear(H, 2*L*kv_dim)`` (``kv_dim = kv_heads * head_dim``); :func:`export_prompt` replaces it by
    the keys/values it produces, so the saved prefix is the final one. Initialisation follows
    PyTorch's defaults as PEFT does (embedding N(0, 1), Linear U(+-1/sqrt(fan_in))).

    ``init`` (deep prompts only): ``"random"`` is PEFT's N(0, 1). ``"vocab"`` / ``"text"`` start
    from the keys/values the frozen model itself computes for real tokens (Li & Liang's
    "initialise with the activations of real words"): P uniformly drawn token ids, or
    ``init_text``'s tokens truncated or repeated to P (as :class:`PromptTuning`), run as one
    sequence at positions ``0..P-1``, so at step 0 the model sees the input as if that text
    preceded it. These need ``model=`` (a :class:`jlora.models.llama.LlamaForCausalLM`) in
    :func:`apply_prompt`, and ``tokenizer=`` for ``"text"``. Why it matters: N(0, 1) keys/values are
    far off the scale of a trained model's (SmolLM2-135M's layer-0 values have std ~0.05), so a
    random deep prefix starts by wrecking the model (held-out loss 3.9 -> 14 on ChatterBot) and
    40 steps do not recover; token keys/values start at (or below) the base model's loss.

    Example::

        spec = jlora.PrefixTuning(num_virtual_tokens=10, projection_hidden=128)
        adapted = jlora.apply_prompt(params, spec, key, config=model.config)
        spec = jlora.PrefixTuning(20, init="vocab")
        adapted = jlora.apply_prompt(params, spec, key, config=model.config, model=model)
    """

    num_virtual_tokens: int = 20
    projection_hidden: int | None = None
    init: str = "random"
    init_text: str | None = None

    method = "prefix_tuning"
    kind = "prefix_tuning"


    cli_method = "prefix"
    cli_fields = (_VIRTUAL_TOKENS,
                  CliField("prefix_projection", None, "prefix: hidden size of Li & Liang's MLP reparameterisation "
                           "(default: none, deep prompts)", "optional_positive_int"),
                  CliField("prefix_init", "random", "prefix (deep prompts, Llama): random = PEFT's N(0,1); vocab / "
                           "text = the keys/values the frozen model computes for random tokens / --prompt-init-text",
                           "choice", ("random", "vocab", "text")),
                  _INIT_TEXT)

    @classmethod
    def from_cli(cls, settings, common, context):
        return cls(settings["virtual_tokens"], projection_hidden=settings["prefix_projection"],
                   init=settings["prefix_init"],
                   init_text=settings["prompt_init_text"] if settings["prefix_init"] == "text" else None)
    def __post_init__(self):
        object.__setattr__(self, "num_virtual_tokens",
                           _positive_int(self.num_virtual_tokens, "PrefixTuning", "num_virtual_tokens"))
        if self.projection_hidden is not None:
            object.__setattr__(self, "projection_hidden",
                               _positive_int(self.projection_hidden, "PrefixTuning", "projection_hidden"))
        if self.init not in PROMPT_INITS:
            raise ValueError(f"PrefixTuning.init must be one of {PROMPT_INITS}, got {self.init!r}")
        if self.init != "random" and self.projection_hidden is not None:
            raise ValueError(f"PrefixTuning(init={self.init!r}) initialises the deep prefix itself; it does not "
                             f"combine with projection_hidden={self.projection_hidden} (the Li & Liang MLP)")
        if self.init == "text" and (not isinstance(self.init_text, str) or not self.init_text.strip()):
            raise ValueError(f"PrefixTuning(init='text') needs a non-empty init_text, got {self.init_text!r}")
        if self.init != "text" and self.init_text is not None:
            raise ValueError(f"PrefixTuning.init_text is only used with init='text' (init={self.init!r})")


@dataclasses.dataclass(frozen=True)
class PTuning(_PromptSpec):
    """P-tuning v1 (Liu et al. 2021; PEFT ``PromptEncoder``): virtual-token embeddings passed
    through a prompt encoder, then put in front of the input like prompt tuning.

    ``encoder="mlp"``: ``Linear(d, h) -> ReLU -> Linear(h, h) -> ReLU -> Linear(h, d)``;
    ``encoder="lstm"``: a bidirectional ``lstm_layers``-layer LSTM (d -> h per direction) ->
    ``Linear(2h, 2h) -> ReLU -> Linear(2h, d)``. ``hidden`` (h) defaults to the model's hidden
    size d, as PEFT's ``encoder_hidden_size``. :func:`export_prompt` replaces the encoder by its
    output (a plain prompt-tuning embedding).

    Example::

        spec = jlora.PTuning(num_virtual_tokens=20, encoder="lstm", hidden=128)
    """

    num_virtual_tokens: int = 20
    encoder: str = "mlp"
    hidden: int | None = None
    lstm_layers: int = 2

    method = "p_tuning"
    kind = "p_tuning"


    cli_method = "ptuning"
    cli_fields = (_VIRTUAL_TOKENS,
                  CliField("ptuning_encoder", "mlp", "ptuning: the prompt encoder", "choice", ("mlp", "lstm")),
                  CliField("ptuning_hidden", None, "ptuning: encoder hidden size (default: the model's)",
                           "optional_positive_int"))

    @classmethod
    def from_cli(cls, settings, common, context):
        return cls(settings["virtual_tokens"], encoder=settings["ptuning_encoder"], hidden=settings["ptuning_hidden"])
    def __post_init__(self):
        object.__setattr__(self, "num_virtual_tokens",
                           _positive_int(self.num_virtual_tokens, "PTuning", "num_virtual_tokens"))
        if self.encoder not in PTUNING_ENCODERS:
            raise ValueError(f"PTuning.encoder must be one of {PTUNING_ENCODERS}, got {self.encoder!r}")
        if self.hidden is not None:
            object.__setattr__(self, "hidden", _positive_int(self.hidden, "PTuning", "hidden"))
        object.__setattr__(self, "lstm_layers", _positive_int(self.lstm_layers, "PTuning", "lstm_layers"))


# ------------------------------------------------------------------------------------------
# model geometry

@dataclasses.dataclass(frozen=True)
class PromptGeometry:
    """What the prompt methods need to know about a model."""

    hidden_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int


def geometry(config) -> PromptGeometry:
    """Reads :class:`PromptGeometry` from a model config with Hugging Face-style attribute names
    (``hidden_size``, ``num_hidden_layers``, ``num_attention_heads``, optional
    ``num_key_value_heads`` and ``head_dim``), a mapping with those keys, or a PromptGeometry."""
    if isinstance(config, PromptGeometry):
        return config
    get = (lambda k: config.get(k)) if isinstance(config, Mapping) else (lambda k: getattr(config, k, None))
    hidden, layers, heads = get("hidden_size"), get("num_hidden_layers"), get("num_attention_heads")
    missing = [n for n, v in (("hidden_size", hidden), ("num_hidden_layers", layers),
                              ("num_attention_heads", heads)) if v is None]
    if missing:
        raise ValueError(f"config {type(config).__name__} has no {missing}; pass a model config with Hugging Face "
                         f"names or jlora.methods.prompt.PromptGeometry(hidden_size, num_layers, num_kv_heads, head_dim)")
    kv = get("num_key_value_heads") or heads
    head_dim = get("head_dim") or hidden // heads
    return PromptGeometry(int(hidden), int(layers), int(kv), int(head_dim))


# ------------------------------------------------------------------------------------------
# apply

def _normal(key, shape):
    return jax.random.normal(key, shape, jnp.float32)


def _linear(key, n_in, n_out, out_shape=None):
    """PyTorch ``nn.Linear`` default init in Flax layout: kernel (in, out), bias (out,)."""
    bound = 1.0 / math.sqrt(n_in)
    kk, kb = jax.random.split(key)
    out_shape = (n_out,) if out_shape is None else tuple(out_shape)
    return {"kernel": jax.random.uniform(kk, (n_in,) + out_shape, jnp.float32, -bound, bound),
            "bias": jax.random.uniform(kb, out_shape, jnp.float32, -bound, bound)}


def _find_embedding(params, pattern: str, hidden: int):
    flat, _ = flatten_with_paths(params, is_leaf=is_adapter_leaf)
    hits = [(p, unwrap(l)) for p, l in flat if matches(p, (pattern,), modules=False)]
    if len(hits) != 1:
        tables = [p for p, l in flat if np.ndim(unwrap(l)) == 2 and np.shape(unwrap(l))[-1] == hidden
                  and p.rsplit("/", 1)[-1] in ("embedding", "weight")]
        raise ValueError(f"embedding pattern {pattern!r} matched {len(hits)} leaves {[p for p, _ in hits][:4]}; it "
                         f"must match the token embedding table exactly once. Candidates: {tables[:8]}")
    path, table = hits[0]
    if np.ndim(table) != 2 or np.shape(table)[1] != hidden:
        raise ValueError(f"{path!r} has shape {np.shape(table)}, not (vocab, hidden={hidden})")
    return path, table


def _text_ids(tokenizer, text: str):
    if tokenizer is None:
        raise ValueError("PromptTuning(init='text') needs tokenizer= in apply_prompt (a tokenizers.Tokenizer, a "
                         "transformers tokenizer, or a function text -> token ids)")
    out = tokenizer.encode(text) if hasattr(tokenizer, "encode") else tokenizer(text)
    ids = list(getattr(out, "ids", out))
    if not ids or not all(isinstance(i, (int, np.integer)) for i in ids):
        raise ValueError(f"the tokenizer gave no token ids for init_text {text!r}: {ids!r:.80}")
    return ids


def prompt_init_ids(spec, vocab_size: int, key=None, tokenizer=None) -> np.ndarray:
    """The token ids whose embeddings (prompt tuning) or keys/values (prefix tuning) initialise a
    ``"vocab"`` / ``"text"`` prompt (PEFT's rules:
    uniform over the whole vocabulary; or the text's ids truncated, or repeated ``ceil`` times and cut)."""
    n = spec.num_virtual_tokens
    if spec.init == "vocab":
        key = jax.random.key(0) if key is None else key
        return np.asarray(jax.random.randint(key, (n,), 0, vocab_size))
    ids = _text_ids(tokenizer, spec.init_text)
    if len(ids) < n:
        ids = ids * math.ceil(n / len(ids))
    ids = np.asarray(ids[:n], np.int64)
    if ids.max() >= vocab_size or ids.min() < 0:
        raise ValueError(f"init_text token ids {ids.tolist()} fall outside the embedding table (vocab {vocab_size})")
    return ids


def _lstm_params(key, n_in, hidden, layers):
    """PyTorch ``nn.LSTM`` layout (gates i, f, g, o) in Flax (in, out) order, torch's U(+-1/sqrt(h)) init."""
    bound = 1.0 / math.sqrt(hidden)
    out = {}
    for layer in range(layers):
        width = n_in if layer == 0 else 2 * hidden
        for direction in ("", "_reverse"):
            key, *ks = jax.random.split(key, 5)
            u = lambda k, shape: jax.random.uniform(k, shape, jnp.float32, -bound, bound)
            out[f"l{layer}{direction}"] = {"w_ih": u(ks[0], (width, 4 * hidden)), "w_hh": u(ks[1], (hidden, 4 * hidden)),
                                          "b_ih": u(ks[2], (4 * hidden,)), "b_hh": u(ks[3], (4 * hidden,))}
    return out


def check_prefix(prefix, num_layers: int, batch: int, heads: int, head_dim: int, heads_name: str = "heads") -> int:
    """Validates a prompt-protocol ``prefix`` (``{"k", "v"}``, each ``(num_layers, batch, P, heads,
    head_dim)``) for a model with these sizes; returns its length P. Models call it on entry."""
    if not isinstance(prefix, Mapping) or set(prefix) != {"k", "v"}:
        raise ValueError(f"prefix must be a dict with keys 'k' and 'v', got {type(prefix).__name__}"
                         f"{sorted(prefix) if isinstance(prefix, Mapping) else ''}")
    want = (num_layers, batch, None, heads, head_dim)
    for name in ("k", "v"):
        shape = tuple(np.shape(prefix[name]))
        if len(shape) != 5 or any(w is not None and w != s for w, s in zip(want, shape)):
            raise ValueError(f"prefix[{name!r}] has shape {shape}; expected (num_layers, batch, P, {heads_name}, "
                             f"head_dim) = ({want[0]}, {batch}, P, {want[3]}, {want[4]})")
    if np.shape(prefix["k"]) != np.shape(prefix["v"]):
        raise ValueError(f"prefix k and v shapes differ: {np.shape(prefix['k'])} vs {np.shape(prefix['v'])}")
    return int(np.shape(prefix["k"])[2])


def _prefix_model(model):
    """``model`` if it implements the prefix-initialisation protocol: ``model.token_prefix(params,
    ids)`` (the keys/values its layers compute for ``ids``) and ``model.config.vocab_size``."""
    if not callable(getattr(model, "token_prefix", None)) or not hasattr(getattr(model, "config", None), "vocab_size"):
        raise ValueError(f"PrefixTuning(init='vocab' | 'text') needs model= a jlora Llama (or any model whose "
                         f"token_prefix(params, ids) gives the keys/values its KV cache holds), got "
                         f"{type(model).__name__}; use init='random' for other models")
    return model


def token_prefix(model, params, ids):
    """The keys/values ``(P, L, 2, kv_heads, head_dim)`` that ``model`` computes for the token ids
    ``ids`` (P,) run as one sequence at positions ``0..P-1``: a deep prefix equal to having those
    tokens in front of the input (``model.token_prefix``; a jlora Llama implements it). ``params``
    may carry adapters (the forward is lifted)."""
    return _prefix_model(model).token_prefix(params, ids)


def init_prompt(spec, key, config, *, embedding_table=None, tokenizer=None, prefix=None) -> dict:
    """The plain (unwrapped) parameters of a prompt method: ``{kind: {...}}`` (see the module doc).
    ``prefix``: the ``(P, L, 2, kv_heads, head_dim)`` start of a ``PrefixTuning(init="vocab" | "text")``
    (:func:`token_prefix`)."""
    if not isinstance(spec, _PromptSpec):
        raise TypeError(f"spec must be jlora.PromptTuning / PrefixTuning / PTuning, got {spec!r}")
    g = geometry(config)
    n = spec.num_virtual_tokens
    k_emb, k_enc = jax.random.split(key)
    if isinstance(spec, PromptTuning):
        if spec.init == "random":
            emb = _normal(k_emb, (n, g.hidden_size))
        else:
            ids = prompt_init_ids(spec, embedding_table.shape[0], k_emb, tokenizer)
            emb = jnp.asarray(embedding_table)[jnp.asarray(ids)].astype(jnp.float32)
        return {"prompt_tuning": {"embedding": emb}}
    if isinstance(spec, PrefixTuning):
        kv_dim = g.num_kv_heads * g.head_dim
        shape = (n, g.num_layers, 2, g.num_kv_heads, g.head_dim)
        if spec.init != "random":
            if prefix is None or tuple(np.shape(prefix)) != shape:
                raise ValueError(f"PrefixTuning(init={spec.init!r}) needs the token keys/values prefix= of shape "
                                 f"{shape}, got {None if prefix is None else np.shape(prefix)} (apply_prompt "
                                 f"computes it when given model=)")
            return {"prefix_tuning": {"embedding": jnp.asarray(prefix, jnp.float32)}}
        if spec.projection_hidden is None:
            return {"prefix_tuning": {"embedding": _normal(k_emb, shape)}}
        k0, k2 = jax.random.split(k_enc)
        return {"prefix_tuning": {
            "embedding": _normal(k_emb, (n, kv_dim)),
            "transform": {"0": _linear(k0, kv_dim, spec.projection_hidden),
                          "2": _linear(k2, spec.projection_hidden, None,
                                       (g.num_layers, 2, g.num_kv_heads, g.head_dim))}}}
    d = g.hidden_size
    h = spec.hidden or d
    out = {"embedding": _normal(k_emb, (n, d))}
    ks = jax.random.split(k_enc, 4)
    if spec.encoder == "mlp":
        out["mlp_head"] = {"0": _linear(ks[0], d, h), "2": _linear(ks[1], h, h), "4": _linear(ks[2], h, d)}
    else:
        out["lstm_head"] = _lstm_params(ks[0], d, h, spec.lstm_layers)
        out["mlp_head"] = {"0": _linear(ks[1], 2 * h, 2 * h), "2": _linear(ks[2], 2 * h, d)}
    return {"p_tuning": out}


def _wrap(tree, prefix: str):
    if isinstance(tree, Mapping):
        return {k: _wrap(v, f"{prefix}/{k}") for k, v in tree.items()}
    return Trainable(tree, prefix)


def _with_entry(params, value):
    """``params`` with the top-level prompt entry set to ``value``."""
    return _api.with_entry(params, PROMPT_KEY, value)


def apply_prompt(params, spec, key=None, *, config, tokenizer=None, model=None):
    """Adds the trainable parameters of a prompt method (``spec``) to ``params`` under the
    top-level ``"jlora_prompt"`` entry, as :class:`jlora.Trainable` leaves.

    ``config`` is the model's config (Hugging Face names: ``hidden_size``, ``num_hidden_layers``,
    ``num_attention_heads``, ``num_key_value_heads``, ``head_dim``) or a :class:`PromptGeometry`.
    ``tokenizer`` is needed by ``PromptTuning(init="text")`` and ``PrefixTuning(init="text")``,
    ``model`` (the Llama ``params`` belong to) by ``PrefixTuning(init="vocab" | "text")``. ``params`` may already carry LoRA
    nodes (the two combine); it must not already carry a prompt.

    Example::

        adapted = jlora.apply_prompt(params, jlora.PrefixTuning(10), jax.random.key(0), config=model.config)
        kwargs = jlora.prompt_kwargs(adapted, batch_size=4)     # {"prefix": {"k": ..., "v": ...}}
    """
    if not isinstance(spec, _PromptSpec):
        raise TypeError(f"spec must be jlora.PromptTuning / PrefixTuning / PTuning, got {spec!r}")
    if isinstance(params, Mapping) and PROMPT_KEY in params:
        raise ValueError(f"params already carry a prompt ({PROMPT_KEY!r}); one prompt method per tree")
    key = jax.random.key(0) if key is None else (jax.random.key(key) if isinstance(key, int) else key)
    g = geometry(config)
    table = None
    if isinstance(spec, PromptTuning) and spec.init != "random":
        _, table = _find_embedding(params, spec.embedding, g.hidden_size)
    prefix = None
    if isinstance(spec, PrefixTuning) and spec.init != "random":
        if model is None:
            raise ValueError(f"PrefixTuning(init={spec.init!r}) needs model= (the Llama that params belong to): the "
                             f"prefix starts as the keys/values it computes for real tokens")
        k_ids = jax.random.split(key)[0]           # the key init_prompt would draw the embedding with
        ids = prompt_init_ids(spec, _prefix_model(model).config.vocab_size, k_ids, tokenizer)
        prefix = token_prefix(model, params, ids)
    plain = init_prompt(spec, key, g, embedding_table=table, tokenizer=tokenizer, prefix=prefix)
    return _with_entry(params, _wrap(plain, PROMPT_KEY))


# ------------------------------------------------------------------------------------------
# forward: the kwargs the model takes

def prompt_params(adapted):
    """The plain arrays under ``"jlora_prompt"`` (``{kind: {...}}``), or None when there is no prompt."""
    if not isinstance(adapted, Mapping) or PROMPT_KEY not in adapted:
        return None
    entry = adapted[PROMPT_KEY]
    tree = jax.tree_util.tree_map(unwrap, entry, is_leaf=lambda x: isinstance(x, Trainable))
    if not isinstance(tree, Mapping) or len(tree) != 1 or next(iter(tree)) not in KINDS:
        raise ValueError(f"{PROMPT_KEY!r} must hold exactly one of {KINDS}, found {list(tree) if isinstance(tree, Mapping) else tree!r}")
    return tree


def _dense(p, x):
    k = p["kernel"]
    return jnp.tensordot(x, k, axes=1) + p["bias"]


def _lstm_direction(p, xs, reverse: bool):
    """One direction of a PyTorch-layout LSTM layer over xs (T, in) -> (T, h)."""
    hidden = p["w_hh"].shape[0]
    gates_x = xs @ p["w_ih"] + p["b_ih"] + p["b_hh"]

    def step(carry, gx):
        h, c = carry
        z = gx + h @ p["w_hh"]
        i, f, g, o = jnp.split(z, 4, axis=-1)
        c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
        h = jax.nn.sigmoid(o) * jnp.tanh(c)
        return (h, c), h

    zeros = jnp.zeros((hidden,), xs.dtype)
    _, hs = jax.lax.scan(step, (zeros, zeros), gates_x, reverse=reverse)
    return hs


def bidirectional_lstm(lstm, x):
    """PyTorch ``nn.LSTM(bidirectional=True, batch_first=True)`` on one sequence ``x`` (T, in):
    returns (T, 2h), forward and backward outputs concatenated per layer, as torch does."""
    layers = sorted({int(k[1:].split("_")[0]) for k in lstm})
    for layer in layers:
        x = jnp.concatenate([_lstm_direction(lstm[f"l{layer}"], x, False),
                             _lstm_direction(lstm[f"l{layer}_reverse"], x, True)], axis=-1)
    return x


def prompt_encoder_output(p_tuning: Mapping):
    """P-tuning v1's encoder applied to its embedding: (P, hidden)."""
    x = p_tuning["embedding"]
    mlp = p_tuning["mlp_head"]
    if "lstm_head" in p_tuning:
        x = bidirectional_lstm(p_tuning["lstm_head"], x)
        return _dense(mlp["2"], jax.nn.relu(_dense(mlp["0"], x)))
    x = jax.nn.relu(_dense(mlp["0"], x))
    x = jax.nn.relu(_dense(mlp["2"], x))
    return _dense(mlp["4"], x)


def prefix_values(prefix_tuning: Mapping):
    """The final prefix ``(P, L, 2, kv_heads, head_dim)`` (through the Li & Liang MLP when present)."""
    emb = prefix_tuning["embedding"]
    if "transform" not in prefix_tuning:
        if emb.ndim != 5:
            raise ValueError(f"a prefix without a transform must be (P, L, 2, kv_heads, head_dim), got {emb.shape}")
        return emb
    t = prefix_tuning["transform"]
    return _dense(t["2"], jnp.tanh(_dense(t["0"], emb)))


def prompt_kwargs(adapted, batch_size: int, dtype=None) -> dict:
    """The keyword arguments that feed ``adapted``'s prompt to a model implementing jlora's prompt
    protocol: ``{"prompt_embeddings": (B, P, hidden)}`` (prompt tuning, P-tuning) or
    ``{"prefix": {"k": (L, B, P, kv_heads, head_dim), "v": ...}}`` (prefix tuning); ``{}`` when
    ``adapted`` has no prompt, so a loss can always call it. Differentiable: call it inside the
    loss so the gradient reaches the prompt parameters.

    Example::

        logits = forward(params, ids, mask, **jlora.prompt_kwargs(params, ids.shape[0]))
    """
    tree = prompt_params(adapted)
    if tree is None:
        return {}
    (kind, p), = tree.items()
    cast = (lambda x: x) if dtype is None else (lambda x: x.astype(dtype))
    if kind == "prefix_tuning":
        values = cast(prefix_values(p))                           # (P, L, 2, KV, D)
        kv = jnp.moveaxis(values, 0, 2)                           # (L, 2, P, KV, D)
        kv = jnp.broadcast_to(kv[:, :, None], kv.shape[:2] + (batch_size,) + kv.shape[2:])
        return {"prefix": {"k": kv[:, 0], "v": kv[:, 1]}}
    emb = p["embedding"] if kind == "prompt_tuning" else prompt_encoder_output(p)
    emb = cast(emb)
    return {"prompt_embeddings": jnp.broadcast_to(emb[None], (batch_size,) + emb.shape)}


def num_virtual_tokens(adapted) -> int:
    """P of ``adapted``'s prompt (0 without one)."""
    tree = prompt_params(adapted)
    if tree is None:
        return 0
    (kind, p), = tree.items()
    return int(p["embedding"].shape[0])


def pad_labels(labels, num_virtual: int, ignore_index: int = IGNORE_INDEX):
    """Labels for outputs that start with ``num_virtual`` virtual tokens: ``ignore_index`` in front
    (PEFT pads with -100 the same way)."""
    labels = jnp.asarray(labels)
    if num_virtual == 0:
        return labels
    pad = jnp.full(labels.shape[:-1] + (num_virtual,), ignore_index, labels.dtype)
    return jnp.concatenate([pad, labels], axis=-1)


# ------------------------------------------------------------------------------------------
# export / load

def export_prompt(adapted):
    """``adapted`` with every prompt reparameterisation replaced by what it produces: the Li &
    Liang MLP by the final ``(P, L, 2, kv_heads, head_dim)`` keys/values (a deep prefix), and
    P-tuning's encoder by its output embeddings (a prompt-tuning prompt). The forward is unchanged
    and the saved adapter holds only the final prompt. Trees without a prompt are returned as is.

    Example::

        jlora.io.save_adapter("out/adapter", jlora.export_prompt(adapted), spec=spec)
    """
    tree = prompt_params(adapted)
    if tree is None:
        return adapted
    (kind, p), = tree.items()
    if kind == "prefix_tuning" and "transform" in p:
        plain = {"prefix_tuning": {"embedding": prefix_values(p)}}
    elif kind == "p_tuning":
        plain = {"prompt_tuning": {"embedding": prompt_encoder_output(p)}}
    else:
        return adapted
    return _with_entry(adapted, _wrap(plain, PROMPT_KEY))


def _placeholders(records):
    tree: dict = {}
    for r in records:
        parts = r["path"].split("/")[1:]
        node = tree
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = Trainable(np.zeros(tuple(r["shape"]), np.dtype(r["dtype"])), r["path"])
    return tree


_api.register_saved_entry(PROMPT_KEY, _placeholders, "a prompt")
