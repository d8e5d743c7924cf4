"""Instruction tuning of a causal LM (SmolLM2-135M-Instruct by default) on real instruction
data, for the CLI (``--model smollm2``) and ``examples/instruct_smollm2.py``."""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jlora.data.instruct import IGNORE_INDEX
from jlora.methods.prompt import pad_labels, prompt_kwargs


def masked_lm_loss(logits, labels):
    """Mean next-token cross-entropy over positions whose label is not ``IGNORE_INDEX``
    (labels are unshifted: position t predicts ``labels[t + 1]``). Returns (loss, n_tokens).

    Logits longer than the labels come from a model run with ``P`` virtual tokens in front
    (prompt tuning, P-tuning): the labels get ``P`` ignored entries in front, as PEFT does."""
    extra = logits.shape[1] - labels.shape[1]
    if extra < 0:
        raise ValueError(f"logits cover {logits.shape[1]} positions but labels {labels.shape[1]}")
    labels = pad_labels(labels, extra)
    logits = logits[:, :-1].astype(jnp.float32)
    target = labels[:, 1:]
    valid = target != IGNORE_INDEX
    logp = jax.nn.log_softmax(logits, -1)
    picked = jnp.take_along_axis(logp, jnp.where(valid, target, 0)[..., None], -1)[..., 0]
    n = jnp.maximum(valid.sum(), 1)
    return -(picked * valid).sum() / n, valid.sum()


@dataclasses.dataclass
class InstructionTask:
    """SmolLM2 (Llama) + ChatML-formatted instruction pairs with the loss on response tokens."""

    data: str = "chatterbot"
    max_length: int = 96
    seed: int = 0
    scan_layers: bool = False
    loaded: tuple | None = None   # (model, params, tokenizer) to reuse, e.g. a tiny model in tests

    kind = "instruction"
    model_name = "smollm2"
    peft_task_type = "CAUSAL_LM"

    def __post_init__(self):
        from jlora import data as jdata
        from jlora.models import llama

        self.splits = jdata.instruction_data(self.data, seed=self.seed)
        if self.loaded is None:
            self.loaded = llama.load_pretrained("smollm2", scan_layers=self.scan_layers)
        self.model, self.params, self.tokenizer = self.loaded
        self.arrays = {name: jdata.tokenize_instructions(ds, self.tokenizer, self.max_length, chat=True)
                       for name, ds in self.splits.items()}
        self.targets = dict(llama.DEFAULT_TARGETS)
        self.exclude = {}
        self.head = None
        self.naming = lambda path, layer=None: llama.hf_module_name(path, layer, prefix="")

    def example(self):
        a = self.arrays["train"]
        return (a["input_ids"][:1], a["attention_mask"][:1])

    def forward(self, lifted: Callable, params, batch, train: bool = False, key=None):
        """Logits; ``P + T`` positions long when ``params`` carries a prompt-tuning / P-tuning prompt."""
        kwargs = {"jlora_rng": key} if (train and key is not None) else {}
        kwargs.update(prompt_kwargs(params, batch["input_ids"].shape[0]))
        return lifted(params, batch["input_ids"], batch["attention_mask"], **kwargs)

    def loss_fn(self, lifted: Callable):
        def loss(params, batch, key):
            logits = self.forward(lifted, params, batch, train=True, key=key)
            value, n = masked_lm_loss(logits, batch["labels"])
            return value, {"response_tokens": n.astype(jnp.float32)}
        return loss

    def tokens_per_example(self) -> int:
        return self.max_length

    def evaluate(self, lifted: Callable, params, split: str = "validation", batch_size: int = 8,
                 limit: int | None = None) -> dict:
        """Token-weighted mean cross-entropy on response tokens and its perplexity."""
        arrays = self.arrays[split]
        n = len(arrays["input_ids"]) if limit is None else min(limit, len(arrays["input_ids"]))
        batch_size = min(batch_size, n)
        fn = jax.jit(lambda p, b: masked_lm_loss(self.forward(lifted, p, b), b["labels"]))
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

    def generate(self, lifted: Callable, params, instruction: str, max_new_tokens: int = 40) -> str:
        from jlora.data.instruct import chat_prompt
        from jlora.models import llama

        ids = self.tokenizer.encode(chat_prompt(instruction), add_special_tokens=False).ids
        eos = self.tokenizer.token_to_id("<|im_end|>")
        out = llama.generate(self.model, params, np.asarray([ids], np.int32), max_new_tokens, eos_id=eos,
                             apply_fn=lifted, **prompt_kwargs(params, 1))
        out = np.asarray(out)[0].tolist()
        if eos in out:
            out = out[:out.index(eos)]
        return self.tokenizer.decode(out)
