"""Fine-tuning a causal LM (SmolLM2-135M-Instruct by default, or any local Llama / Mistral / Qwen2
checkpoint) on instruction, chat or plain-text data, for the CLI and ``examples/instruct_smollm2.py``."""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jlora.data.instruct import IGNORE_INDEX
from jlora.methods.prompt import prompt_kwargs
import pathlib
from jlora.data.chat import TextFormat
from jlora import assets
from jlora.models.llama import SMOLLM2_GGUF
from jlora import data as jdata
from jlora.models import llama
from jlora.cli.options import DATA_OPTIONS, check_unsealed
from jlora.eval.metrics import GENERATION_METRICS, generation_metrics
from jlora.data import chat, files
from jlora.data.chat import _special_prefix, generation_prompt
from jlora.data.instruct import chat_prompt
from jlora.train.losses import check_loss_chunk, masked_lm_loss  # noqa: F401 (re-exported)


#: prompt / response column pairs recognised in a data file, in order of preference
_PAIRS = (("prompt", "response"), ("prompt", "completion"), ("instruction", "response"), ("instruction", "output"),
          ("question", "answer"), ("input", "output"))
#: ChatML as a Jinja chat template (the bundled SmolLM2's format)
CHATML_JINJA = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _prompt(instruction: str, input: str = "") -> str:
    """An instruction and its optional input as one user prompt (blank line between)."""
    return instruction if not (input or "").strip() else f"{instruction}\n\n{input}"


def _file_layout(cols, opts) -> tuple[str, object] | None:
    """How the trainer reads a data file with columns ``cols`` and the data flags ``opts``:
    ``("messages", column)``, ``("pairs", (prompt, input or None, response))``, ``("text", column)``,
    or None when it holds nothing to train on (in that order of preference)."""
    if opts["messages_column"] or ("messages" in cols and not (opts["prompt_column"] or opts["text_column"])):
        return "messages", opts["messages_column"] or "messages"
    pair = _pair_columns(cols, opts)
    if pair is not None:
        return "pairs", pair
    if opts["text_column"] or "text" in cols:
        return "text", opts["text_column"] or "text"
    return None


def _pair_columns(cols, opts) -> tuple[str, str | None, str] | None:
    """(prompt column, input column or None, response column) named by the flags or found in ``cols``."""
    if opts["prompt_column"] or opts["response_column"]:
        return (opts["prompt_column"] or "prompt", None, opts["response_column"] or "response")
    for p, r in _PAIRS:
        if p in cols and r in cols:
            extra = "input" if p == "instruction" and "input" in cols else None
            return p, extra, r
    return None


def _text_format(model_path, tokenizer):
    """The chat template and special tokens of a checkpoint (a directory, or a GGUF file whose
    ``tokenizer`` has already been built by the loader)."""


    if model_path in (None, "smollm2"):

        model_path = str(assets.ensure("smollm2") / SMOLLM2_GGUF)
    if str(model_path).endswith(".gguf"):
        import gguf

        return TextFormat.from_gguf(gguf.GGUFReader(str(model_path)), tokenizer)
    return TextFormat.from_directory(pathlib.Path(model_path))


def mask_is_redundant(arrays) -> bool:
    """True when every row's attention mask is a run of ones then zeros (right padding) and no padded
    position carries a label. A causal decoder's loss is then the same without the mask: a real token
    attends only to earlier positions, all real, and its position ids are 0, 1, ... either way; only
    the padded positions' logits change, and no label reads them. (Packed rows have an all-ones mask.)"""
    mask = np.asarray(arrays["attention_mask"]).astype(bool)
    if mask.ndim != 2:
        return False
    lengths = mask.sum(axis=1)
    right = np.arange(mask.shape[1])[None, :] < lengths[:, None]
    labels = arrays.get("labels")
    return bool(np.array_equal(mask, right) and (labels is None or np.all(np.asarray(labels)[~mask] == IGNORE_INDEX)))


@dataclasses.dataclass
class InstructionTask:
    """A Llama-family decoder + data with the loss on response (assistant) tokens, or on every token
    for plain text.

    The bundled pair (SmolLM2 + ChatterBot / natural_instructions) uses ChatML prompts. A local
    checkpoint (``model_path``) renders its data with its own chat template when it has one
    (:mod:`jlora.data.chat`); a data file (``data`` a path, ``options`` the CLI's data flags) holds a
    ``messages`` column (chat), prompt / response columns, or a ``text`` column."""

    data: str = "chatterbot"
    max_length: int = 96
    seed: int = 0
    scan_layers: bool = False
    loaded: tuple | None = None   # (model, params, tokenizer) to reuse, e.g. a tiny model in tests
    model_path: str | None = "smollm2"   # "smollm2", a .gguf file or a Hugging Face directory
    options: dict | None = None          # jlora.cli.options.DATA_OPTIONS for a data file
    param_dtype: str | None = None       # read the weights in this dtype (e.g. "bfloat16"); None: float32
    remat: bool | str = False            # recompute each layer in the backward pass (or a policy name)
    loss_chunk: int | None = 0           # the head and loss on this many positions at a time (0: all at once)
    attention: str | None = None         # LlamaConfig.attention ("explicit", "xla", "cudnn"); None: the model's
    fuse_projections: bool = False       # q/k/v and gate/up as one matmul each (LlamaConfig.fuse_projections)

    kind = "instruction"
    family = "llama"
    peft_task_type = "CAUSAL_LM"

    def __post_init__(self):

        if self.loaded is None:
            self.loaded = llama.load_pretrained(self.model_path or "smollm2", scan_layers=self.scan_layers,
                                                remat=self.remat, param_dtype=jnp.dtype(self.param_dtype or "float32"))
        self.loss_chunk = check_loss_chunk(self.loss_chunk)
        self.model, self.params, self.tokenizer = self.loaded
        changes = {k: v for k, v in (("attention", self.attention), ("fuse_projections", self.fuse_projections)) if v}
        if changes:   # how the layers compute, not what: the same parameters
            self.model = llama.LlamaForCausalLM(self.model.config.replace(**changes))
        if self.tokenizer is None:
            raise ValueError(f"model {self.model_path} has no tokenizer.json; the task needs one to read text")
        self.text_format = _text_format(self.model_path, self.tokenizer)
        self.bundled_chatml = self.model_path in (None, "smollm2")
        self.packing = bool((self.options or {}).get("packing", False))
        self.from_file = files.looks_like_file(self.data)
        self.targets = dict(llama.DEFAULT_TARGETS)
        self.exclude = {}
        self.head = None
        self.naming = lambda path, layer=None: llama.hf_module_name(path, layer, prefix="")
        if not self.from_file:
            self.splits = jdata.instruction_data(self.data, seed=self.seed)
            if self.bundled_chatml and not self.packing:
                self.arrays = {name: jdata.tokenize_instructions(ds, self.tokenizer, self.max_length, chat=True)
                               for name, ds in self.splits.items()}
            else:
                self.arrays = {name: self._pairs([_prompt(i, x) for i, x in zip(ds["instruction"], ds["input"])],
                                                 ds["response"]) for name, ds in self.splits.items()}
            return

        opts = {**DATA_OPTIONS, **(self.options or {})}
        self.splits = files.local_splits(self.data, opts["validation_file"], opts["test_file"], seed=self.seed)
        self.arrays = {name: self._file_arrays(ds, opts) for name, ds in self.splits.items()}
        for name, a in self.arrays.items():   # a tokenizer larger than the embedding would give NaN logits
            try:
                llama.check_inputs(self.model.config, a["input_ids"], a["attention_mask"])
            except ValueError as e:
                raise ValueError(f"{name} split: the tokenizer's ids do not fit the model: {e}") from None

    def _pairs(self, prompts, responses):

        fmt = self._chat_format() if self.bundled_chatml and not self.from_file else self.text_format
        return chat.tokenize_pairs(prompts, responses, self.tokenizer, fmt, self.max_length, packing=self.packing)

    def _file_arrays(self, ds, opts):
        """Arrays for one split of a data file, by the columns it has (see the class docstring)."""

        where, cols = f"data file {self.data}", ds.column_names
        flags = ("--messages-column", "--prompt-column", "--response-column", "--text-column")
        kind, col = _file_layout(cols, opts) or (None, None)
        if kind == "messages":
            files.require_columns(ds, [col], where, flags)
            try:
                return chat.tokenize_conversations(list(ds[col]), self.tokenizer, self._chat_format(), self.max_length,
                                                   packing=self.packing)
            except ValueError as e:
                raise files.DataFileError(f"{where}: {e}") from None
        if kind == "pairs":
            files.require_columns(ds, [c for c in col if c], where, flags)
            p_col, in_col, r_col = col
            inputs = ds[in_col] if in_col else [""] * len(ds)
            return self._pairs([_prompt(str(p), str(x or "")) for p, x in zip(ds[p_col], inputs)],
                               [str(r) for r in ds[r_col]])
        if kind == "text":
            files.require_columns(ds, [col], where, flags)
            return chat.tokenize_texts([str(t) for t in ds[col]], self.tokenizer, self.text_format, self.max_length,
                                       packing=self.packing)
        raise files.DataFileError(
            f"{where}: found no columns to train a language model on; the columns are {cols}. Expected 'messages' "
            f"(chat), a prompt / response pair ({', '.join('+'.join(p) for p in _PAIRS)}) or 'text'; or name "
            f"them with {', '.join(flags)}")

    def reference_pairs(self, split: str) -> list[tuple[str, list[str]]]:
        """``(prompt, acceptable replies)`` of a split, for generation metrics: one entry per distinct
        prompt, in first-seen order, holding every reply the split gives it (the bundled sets group a
        prompt's answers into one split). A chat row contributes its first user turn and the
        assistant reply after it; a plain-text data set has no prompts and gives ``[]``."""
        check_unsealed(self, split)
        ds = self.splits[split]
        if not self.from_file:
            pairs = [(_prompt(i, x), r) for i, x, r in zip(ds["instruction"], ds["input"], ds["response"])]
        else:
            kind, col = _file_layout(ds.column_names, {**DATA_OPTIONS, **(self.options or {})}) or (None, None)
            if kind == "messages":
                pairs = []
                for conv in ds[col]:
                    turns = [m for m in conv if m.get("role") != "system"]
                    if len(turns) >= 2 and turns[0].get("role") == "user" and turns[1].get("role") == "assistant":
                        pairs.append((str(turns[0]["content"]), str(turns[1]["content"])))
            elif kind == "pairs":
                p_col, in_col, r_col = col
                inputs = ds[in_col] if in_col else [""] * len(ds)
                pairs = [(_prompt(str(p), str(x or "")), str(r)) for p, x, r in zip(ds[p_col], inputs, ds[r_col])]
            else:
                return []
        grouped: dict[str, list[str]] = {}
        for prompt, reply in pairs:
            grouped.setdefault(prompt, [])
            if reply not in grouped[prompt]:
                grouped[prompt].append(reply)
        return list(grouped.items())

    def _chat_format(self):

        if self.bundled_chatml and (self.text_format.chat_template is None or not self.from_file):
            return TextFormat(CHATML_JINJA, eos_token="<|im_end|>")
        return self.text_format

    def example(self):
        a = self.arrays["train"]
        return (a["input_ids"][:1], a["attention_mask"][:1])

    @staticmethod
    def _model_kwargs(params, batch, train: bool, key) -> dict:
        """What the model call takes beside ids and mask: the dropout key when training, a prompt
        method's virtual tokens or prefix, and the segment ids of packed rows (--packing)."""
        kwargs = {"jlora_rng": key} if (train and key is not None) else {}
        kwargs.update(prompt_kwargs(params, batch["input_ids"].shape[0]))
        if "segment_ids" in batch:
            kwargs["segment_ids"] = batch["segment_ids"]
        return kwargs

    def forward(self, lifted: Callable, params, batch, train: bool = False, key=None):
        """Logits; ``P + T`` positions long when ``params`` carries a prompt-tuning / P-tuning prompt."""
        return lifted(params, batch["input_ids"], batch["attention_mask"], **self._model_kwargs(params, batch, train, key))

    def lm_loss(self, lifted: Callable, params, batch, train: bool = False, key=None, *, mask: bool = True):
        """(mean cross-entropy on the batch's labelled tokens, their number), through the model's
        own :meth:`~jlora.models.llama.LlamaForCausalLM.loss`: the head and the loss run
        ``loss_chunk`` positions at a time when it is set, so the float32 logits of the whole
        batch never exist. ``mask=False`` leaves the attention mask out, which changes nothing the
        loss sees when :func:`mask_is_redundant` holds for the rows (the fused attention then gets
        no dense mask: on cuDNN no bias to read and no bias gradient to write)."""
        return lifted(params, batch["input_ids"], batch["labels"], batch["attention_mask"] if mask else None,
                      method="loss", chunk=self.loss_chunk, **self._model_kwargs(params, batch, train, key))

    def loss_fn(self, lifted: Callable):
        mask = not mask_is_redundant(self.arrays["train"])

        def loss(params, batch, key):
            value, n = self.lm_loss(lifted, params, batch, train=True, key=key, mask=mask)
            return value, {"response_tokens": n.astype(jnp.float32)}
        return loss

    def tokens_per_example(self) -> int:
        return self.max_length

    def evaluate(self, lifted: Callable, params, split: str = "validation", batch_size: int = 8,
                 limit: int | None = None, generate: int = 0, max_new_tokens: int = 64) -> dict:
        """Token-weighted mean cross-entropy on response tokens and its perplexity; with ``generate``
        also the generation metrics (:func:`jlora.eval.metrics.generation_metrics`) of greedy replies
        to the split's first ``generate`` prompts. The test split is sealed while a run trains
        (:func:`~jlora.cli.options.check_unsealed`)."""
        check_unsealed(self, split)
        out = self.evaluate_arrays(lifted, params, self.arrays[split], batch_size, limit)
        pairs = self.reference_pairs(split)[:generate] if generate else []
        if pairs:
            scores = generation_metrics(self.replies(lifted, params, [p for p, _ in pairs], max_new_tokens, batch_size),
                                        [r for _, r in pairs])
            out.update({k: scores[k] for k in GENERATION_METRICS}, prompts_decoded=len(pairs))
        return out

    def evaluate_arrays(self, lifted: Callable, params, arrays, batch_size: int = 8, limit: int | None = None) -> dict:
        """:meth:`evaluate` on any tokenised rows (``input_ids``, ``attention_mask``, ``labels``)."""
        n = len(arrays["input_ids"]) if limit is None else min(limit, len(arrays["input_ids"]))
        if n < 1:
            raise ValueError("nothing to evaluate: no rows")
        batch_size = min(batch_size, n)
        mask = not mask_is_redundant({k: v[:n] for k, v in arrays.items()})
        fn = jax.jit(lambda p, b: self.lm_loss(lifted, p, b, mask=mask))
        total, tokens = 0.0, 0
        for s in range(0, n, batch_size):
            b = {k: v[s:min(s + batch_size, n)] for k, v in arrays.items()}
            real = len(b["input_ids"])
            if real < batch_size:  # pad with fully-ignored rows: one compile
                pad = {k: np.repeat(v[-1:], batch_size - real, 0) for k, v in b.items()}
                pad["labels"] = np.full_like(pad["labels"], IGNORE_INDEX)
                b = {k: np.concatenate([b[k], pad[k]]) for k in b}
            value, count = fn(params, b)
            total += float(value) * int(count)
            tokens += int(count)
        loss = total / max(tokens, 1)
        return {"loss": loss, "perplexity": float(np.exp(loss)), "examples": n, "response_tokens": tokens}

    def generate(self, lifted: Callable, params, instruction: str, max_new_tokens: int = 40, **sampling) -> str:
        """The model's reply to one prompt (see :meth:`generate_batch`)."""
        return self.generate_batch(lifted, params, [instruction], max_new_tokens, **sampling)[0]

    def _prompt_ids(self, prompt: str) -> list[int]:

        if self.bundled_chatml:
            return self.tokenizer.encode(chat_prompt(prompt), add_special_tokens=False).ids
        ids = self.tokenizer.encode(generation_prompt(self.text_format, prompt), add_special_tokens=False).ids
        return (_special_prefix(self.tokenizer) + ids) if self.text_format.chat_template is None else ids

    def eos_ids(self) -> list[int]:
        """The ids that end a reply: the checkpoint's EOS (``<|im_end|>`` for the bundled ChatML)."""
        token = "<|im_end|>" if self.bundled_chatml else self.text_format.eos_token
        i = self.tokenizer.token_to_id(token) if token else None
        return [] if i is None else [int(i)]

    def replies(self, lifted: Callable, params, prompts, max_new_tokens: int = 40, batch_size: int = 8,
                **sampling) -> list[str]:
        """:meth:`generate_batch` over any number of prompts, ``batch_size`` at a time."""
        out = []
        for s in range(0, len(prompts), batch_size):
            out += self.generate_batch(lifted, params, prompts[s:s + batch_size], max_new_tokens, **sampling)
        return out

    def generate_batch(self, lifted: Callable, params, prompts, max_new_tokens: int = 40, *, temperature: float = 0.0,
                       top_k: int | None = None, top_p: float | None = None, seed: int = 0) -> list[str]:
        """Replies to ``prompts`` in one batched KV-cache decode: each prompt is rendered as the data
        was (the checkpoint's chat template, or ChatML for the bundled SmolLM2), left-padded, and
        decoded greedily (``temperature=0``) or sampled until EOS or ``max_new_tokens``."""

        if isinstance(prompts, str) or not prompts:
            raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r:.60}")
        rows = [self._prompt_ids(str(p)) for p in prompts]
        width = max(len(r) for r in rows)
        ids = np.zeros((len(rows), width), np.int32)
        mask = np.zeros((len(rows), width), np.int32)
        for i, r in enumerate(rows):   # left padding
            ids[i, width - len(r):], mask[i, width - len(r):] = r, 1
        eos = self.eos_ids()
        out = llama.generate(self.model, params, ids, max_new_tokens, eos_id=eos or None, attention_mask=mask,
                             apply_fn=lifted, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                             **prompt_kwargs(params, len(rows)))
        texts = []
        for row in np.asarray(out).tolist():
            cut = min((row.index(e) for e in eos if e in row), default=len(row))
            texts.append(self.tokenizer.decode(row[:cut]))
        return texts
