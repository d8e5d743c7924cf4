"""Causal-LM training rows from your own data: chat conversations rendered with the checkpoint's
own chat template, prompt / response pairs, or plain text (optionally packed).

A :class:`TextFormat` holds what a checkpoint says about its text: the Jinja chat template
(``tokenizer_config.json``'s ``chat_template``, a ``chat_template.jinja`` file, or a GGUF's
``tokenizer.chat_template``) and its BOS / EOS tokens. Templates are rendered the way
``transformers`` renders them (a sandboxed Jinja environment with ``trim_blocks`` and
``lstrip_blocks``, ``raise_exception``, ``strftime_now`` and a non-escaping ``tojson``).

The loss covers the assistant turns only: :func:`chat_segments` renders the conversation up to each
assistant turn with and without it, and the difference (the reply and the template's end-of-turn
tokens) is the supervised text. A template that does not render a conversation as a prefix of
its continuation (one that rewrites earlier turns) is refused with the turn it broke on.

Example::

    fmt = TextFormat.from_directory("my_llama")
    arrays = tokenize_conversations(rows["messages"], tokenizer, fmt, max_length=512)
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import pathlib
from collections.abc import Mapping, Sequence

import numpy as np

from jlora.data.instruct import IGNORE_INDEX
from jlora.models.llama import _gguf_field

ROLES = ("system", "user", "assistant", "tool")


def _token_text(value) -> str | None:
    """A special token from ``tokenizer_config.json``: a string or ``{"content": ...}``."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


@dataclasses.dataclass(frozen=True)
class TextFormat:
    """A checkpoint's chat template and special tokens (any may be ``None``)."""

    chat_template: str | None = None
    bos_token: str | None = None
    eos_token: str | None = None
    pad_token: str | None = None

    @classmethod
    def from_directory(cls, directory) -> "TextFormat":
        """Reads ``tokenizer_config.json`` (and ``chat_template.jinja`` / ``chat_template.json``)."""
        d = pathlib.Path(directory)
        cfg = {}
        if (d / "tokenizer_config.json").is_file():
            cfg = json.loads((d / "tokenizer_config.json").read_text())
        template = cfg.get("chat_template")
        if (d / "chat_template.jinja").is_file():
            template = (d / "chat_template.jinja").read_text()
        elif (d / "chat_template.json").is_file():
            template = json.loads((d / "chat_template.json").read_text()).get("chat_template", template)
        if isinstance(template, list):   # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
            template = named.get("default") or next(iter(named.values()), None)
        if template is not None and not isinstance(template, str):
            raise ValueError(f"{d}: chat_template must be a string, got {type(template).__name__}")
        return cls(template, _token_text(cfg.get("bos_token")), _token_text(cfg.get("eos_token")),
                   _token_text(cfg.get("pad_token")))

    @classmethod
    def from_gguf(cls, reader, tokenizer) -> "TextFormat":
        """Reads ``tokenizer.chat_template`` and the BOS / EOS ids of a ``gguf.GGUFReader``."""

        template = _gguf_field(reader, "tokenizer.chat_template", None)
        ids = {k: _gguf_field(reader, f"tokenizer.ggml.{k}_token_id", None) for k in ("bos", "eos", "padding")}
        tok = {k: tokenizer.id_to_token(int(v)) if v is not None else None for k, v in ids.items()}
        return cls(template if isinstance(template, str) else None, tok["bos"], tok["eos"], tok["padding"])

    def render(self, messages: Sequence[Mapping], add_generation_prompt: bool = False) -> str:
        """The template applied to ``messages`` (as ``tokenizer.apply_chat_template(tokenize=False)``)."""
        if self.chat_template is None:
            raise ValueError("this checkpoint has no chat template (no chat_template in tokenizer_config.json, "
                             "no chat_template.jinja); use prompt / response columns instead of messages")
        return _compiled(self.chat_template).render(
            messages=list(messages), add_generation_prompt=add_generation_prompt, bos_token=self.bos_token or "",
            eos_token=self.eos_token or "", pad_token=self.pad_token or "", tools=None, documents=None)


_CACHE: dict[str, object] = {}


def _compiled(template: str):
    if template not in _CACHE:
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = lambda x, indent=None, separators=None, sort_keys=False: json.dumps(
            x, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
        try:
            _CACHE[template] = env.from_string(template)
        except TemplateError as e:
            raise ValueError(f"the chat template does not parse: {e}") from None
    return _CACHE[template]


def check_messages(messages, where: str) -> list[dict]:
    """A conversation as a list of ``{"role", "content"}`` dicts, or a ValueError naming ``where``."""
    if isinstance(messages, str):
        try:
            messages = json.loads(messages)
        except json.JSONDecodeError:
            raise ValueError(f"{where}: messages must be a list of {{role, content}} objects (or its JSON), "
                             f"got the string {messages[:60]!r}") from None
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(f"{where}: messages must be a non-empty list of {{role, content}} objects, got {messages!r:.80}")
    out = []
    for j, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"{where}, message {j}: expected {{'role': str, 'content': str}}, got {m!r:.80}")
        if m["role"] not in ROLES:
            raise ValueError(f"{where}, message {j}: role {m['role']!r} is not one of {ROLES}")
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in out):
        raise ValueError(f"{where}: no assistant message, so nothing to learn from")
    return out


def chat_segments(fmt: TextFormat, messages: Sequence[Mapping], where: str = "conversation") -> list[tuple[str, bool]]:
    """``[(text, supervised), ...]`` whose concatenation is the rendered conversation up to its last
    assistant turn; ``supervised`` marks each assistant turn (reply + the template's end of turn)."""
    segments, done = [], ""
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = fmt.render(messages[:k], add_generation_prompt=True)
        full = fmt.render(messages[:k + 1], add_generation_prompt=False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise ValueError(f"{where}: the chat template does not render turn {k} as a continuation of the turns "
                             "before it, so the assistant tokens cannot be told apart; use prompt / response "
                             "columns instead")
        segments += [(prompt[len(done):], False), (full[len(prompt):], True)]
        done = full
    return segments


def _special_prefix(tokenizer) -> list[int]:
    """What the tokenizer's post-processor puts before a text (``[bos]`` for Llama, ``[]`` for Qwen2)."""
    ids = tokenizer.encode("", add_special_tokens=True).ids
    return list(ids[:1])


def _token_id(tokenizer, token: str | None) -> int | None:
    return None if token is None else tokenizer.token_to_id(token)


def _pad(tokenizer, fmt: TextFormat, pad_id: int | None) -> int:
    """The padding id: ``pad_id``, else the checkpoint's pad token, the tokenizer's own ([PAD], <pad>
    ...), its EOS, or 0. Padding is masked out of attention and loss, so any id is correct; these
    are the ones other tools pick."""
    if pad_id is not None:
        return int(pad_id)
    for token in (fmt.pad_token, *(("[PAD]", "<pad>", "<|padding|>") if not tokenizer.padding else ())):
        i = _token_id(tokenizer, token)
        if i is not None:
            return int(i)
    if tokenizer.padding:
        return int(tokenizer.padding["pad_id"])
    eos = _token_id(tokenizer, fmt.eos_token)
    return 0 if eos is None else int(eos)


def _rows_to_arrays(rows: Sequence[tuple[list[int], list[int]]], max_length: int, pad: int) -> dict[str, np.ndarray]:
    n = len(rows)
    ids = np.full((n, max_length), pad, np.int32)
    mask = np.zeros((n, max_length), np.int32)
    labels = np.full((n, max_length), IGNORE_INDEX, np.int32)
    for i, (toks, labs) in enumerate(rows):
        toks, labs = toks[:max_length], labs[:max_length]
        ids[i, :len(toks)], mask[i, :len(toks)], labels[i, :len(labs)] = toks, 1, labs
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _pack(rows: Sequence[tuple[list[int], list[int]]], max_length: int) -> dict[str, np.ndarray]:
    """The rows' tokens and labels concatenated and cut into full rows of ``max_length`` (the short
    tail dropped): no padding. ``segment_ids`` number the examples within each packed row (1, 2, ...;
    an example cut by a row boundary continues as the next row's first segment), and the model
    lets a token attend only to its own example, with positions restarting at each example's start
    (:class:`jlora.models.llama.LlamaForCausalLM`), so no example sees another. The first token of
    every segment gets no label, so no example's last token is trained to predict the next one's
    first (as ``transformers``' ``DataCollatorWithFlattening`` does); prompts stay unsupervised."""
    toks = np.asarray([t for r, _ in rows for t in r], np.int32)
    labs = np.asarray([t for _, r in rows for t in r], np.int32)
    example = np.repeat(np.arange(len(rows), dtype=np.int64), [len(r) for r, _ in rows])
    n = len(toks) // max_length
    if n == 0:
        raise ValueError(f"packing: the rows hold {len(toks)} tokens, fewer than one row of max_length={max_length}")
    ids = toks[:n * max_length].reshape(n, max_length)
    labels = labs[:n * max_length].reshape(n, max_length).copy()
    example = example[:n * max_length].reshape(n, max_length)
    start = np.ones_like(example, bool)
    start[:, 1:] = example[:, 1:] != example[:, :-1]
    labels[start] = IGNORE_INDEX
    segments = np.cumsum(start, axis=1).astype(np.int32)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": labels, "segment_ids": segments}


def _finish(rows, max_length: int, pad: int, packing: bool) -> dict[str, np.ndarray]:
    return _pack(rows, max_length) if packing else _rows_to_arrays(rows, max_length, pad)


def _plain_tokenizer(tokenizer):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tokenizer.to_str())
    tok.no_padding()
    tok.no_truncation()
    return tok


def tokenize_conversations(conversations: Sequence, tokenizer, fmt: TextFormat, max_length: int,
                           pad_id: int | None = None, *, packing: bool = False) -> dict[str, np.ndarray]:
    """Conversations (lists of ``{role, content}``; JSON strings accepted) to int32
    ``input_ids`` / ``attention_mask`` / ``labels`` of shape ``(n, max_length)``, labels on the
    assistant turns only. Each segment is tokenised without added special tokens (the template
    writes its own BOS when it has one). Longer rows keep their start; ``packing`` joins the rows
    into full rows instead (:func:`_pack`)."""
    if max_length <= 0:
        raise ValueError(f"max_length must be positive, got {max_length}")
    tok = _plain_tokenizer(tokenizer)
    rows = []
    for i, conv in enumerate(conversations):
        segs = chat_segments(fmt, check_messages(conv, f"row {i}"), f"row {i}")
        enc = tok.encode_batch([s for s, _ in segs], add_special_tokens=False)
        toks, labs = [], []
        for e, (_, supervised) in zip(enc, segs):
            toks += e.ids
            labs += e.ids if supervised else [IGNORE_INDEX] * len(e.ids)
        rows.append((toks, labs))
    return _finish(rows, max_length, _pad(tokenizer, fmt, pad_id), packing)


def tokenize_pairs(prompts: Sequence[str], responses: Sequence[str], tokenizer, fmt: TextFormat, max_length: int,
                   pad_id: int | None = None, *, packing: bool = False) -> dict[str, np.ndarray]:
    """Prompt / response pairs. With a chat template each pair is a user turn and an assistant turn
    (:func:`tokenize_conversations`); without one the row is ``[bos] + prompt + response + [eos]``
    (BOS as the tokenizer's post-processor adds it, EOS from the checkpoint), loss on response + EOS."""
    if fmt.chat_template is not None:
        convs = [[{"role": "user", "content": p}, {"role": "assistant", "content": r}] for p, r in zip(prompts, responses)]
        return tokenize_conversations(convs, tokenizer, fmt, max_length, pad_id, packing=packing)
    tok = _plain_tokenizer(tokenizer)
    head, eos = _special_prefix(tokenizer), _token_id(tok, fmt.eos_token)
    p_enc = tok.encode_batch([str(p) for p in prompts], add_special_tokens=False)
    r_enc = tok.encode_batch([str(r) for r in responses], add_special_tokens=False)
    rows = []
    for pe, re_ in zip(p_enc, r_enc):
        p = head + list(pe.ids)
        r = list(re_.ids) + ([eos] if eos is not None else [])
        rows.append((p + r, [IGNORE_INDEX] * len(p) + r))
    return _finish(rows, max_length, _pad(tokenizer, fmt, pad_id), packing)


def tokenize_texts(texts: Sequence[str], tokenizer, fmt: TextFormat, max_length: int, *, packing: bool = False,
                   pad_id: int | None = None) -> dict[str, np.ndarray]:
    """Plain text for causal-LM training, loss on every token: ``[bos] + text + [eos]`` per row.

    ``packing=True`` concatenates the rows (each closed by EOS) and cuts the stream into full rows of
    ``max_length`` tokens (the short tail dropped), each document a segment of its own
    (:func:`_pack`); no token is padding, so no compute is wasted."""
    tok = _plain_tokenizer(tokenizer)
    head, eos = _special_prefix(tokenizer), _token_id(tok, fmt.eos_token)
    enc = tok.encode_batch([str(t) for t in texts], add_special_tokens=False)
    docs = [head + list(e.ids) + ([eos] if eos is not None else []) for e in enc]
    return _finish([(d, d) for d in docs], max_length, _pad(tokenizer, fmt, pad_id), packing)


def generation_prompt(fmt: TextFormat, prompt: str) -> str:
    """The text a model should continue to answer ``prompt``: the template's user turn plus its
    assistant header, or the prompt itself when the checkpoint has no template."""
    if fmt.chat_template is None:
        return prompt
    return fmt.render([{"role": "user", "content": prompt}], add_generation_prompt=True)
