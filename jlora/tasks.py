"""Model + data + loss + evaluation bundles used by the ``jlora`` CLI and the examples.

A task knows how to build the (pretrained) model and its params, the tokenised splits, the
loss for :func:`jlora.train.make_step`, and an evaluation on a split. Model names:
``minilm`` (BERT encoder, sequence classification) and ``smollm2`` (Llama decoder, instruction
tuning). Data names: ``rotten_tomatoes``, ``bbc_news`` (classification) and ``chatterbot``,
``natural_instructions:<subtask>`` (instructions).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

CLASSIFICATION_DATA = ("rotten_tomatoes", "bbc_news")
MODELS = ("minilm", "smollm2")


@dataclasses.dataclass
class ClassificationTask:
    """MiniLM (BERT) + a new classification head on a real text-classification set."""

    data: str = "rotten_tomatoes"
    max_length: int = 48
    seed: int = 0
    scan_layers: bool = False

    kind = "classification"
    model_name = "minilm"
    peft_task_type = "SEQ_CLS"     # PEFT files: PeftModelForSequenceClassification (needed for prompts)

    def __post_init__(self):
        from jlora import data as jdata
        from jlora.models import bert

        if self.data not in CLASSIFICATION_DATA:
            raise ValueError(f"data {self.data!r} is not a classification set; choose one of {CLASSIFICATION_DATA}")
        loader = {"rotten_tomatoes": jdata.rotten_tomatoes, "bbc_news": jdata.bbc_news}[self.data]
        self.splits = loader(seed=self.seed)
        self.label_names = self.splits["train"].features["label"].names
        self.model, self.params, self.tokenizer = bert.load_pretrained(
            num_labels=len(self.label_names), scan_layers=self.scan_layers, seed=self.seed)
        self.arrays = jdata.tokenize_classification(self.splits, self.tokenizer, self.max_length)
        self.targets = dict(bert.DEFAULT_TARGETS)
        self.exclude = {"all-linear": bert.ALL_LINEAR_EXCLUDE}
        self.head = r".*/classifier/(kernel|bias)"
        self.naming = lambda path, layer=None: bert.hf_module_name(path, layer, prefix="bert.")

    # -- model functions ------------------------------------------------------------------------
    def example(self):
        a = self.arrays["train"]
        return (a["input_ids"][:2], a["attention_mask"][:2], a["token_type_ids"][:2])

    def forward(self, lifted: Callable, params, batch, train: bool = False, key=None):
        from jlora.methods.prompt import prompt_kwargs

        kwargs = {}
        if train and key is not None:
            kwargs = dict(deterministic=False, rngs={"dropout": key}, jlora_rng=jax.random.fold_in(key, 1))
        # prompt / prefix / P-tuning: the prompt entry of `params` becomes the model's prompt kwargs
        kwargs.update(prompt_kwargs(params, batch["input_ids"].shape[0]))
        return lifted(params, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], **kwargs)

    def loss_fn(self, lifted: Callable):
        def loss(params, batch, key):
            logits = self.forward(lifted, params, batch, train=True, key=key)
            ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch["labels"]).mean()
            acc = jnp.mean(jnp.argmax(logits, -1) == batch["labels"])
            return ce, {"accuracy": acc}
        return loss

    def tokens_per_example(self) -> int:
        return self.max_length

    def evaluate(self, lifted: Callable, params, split: str = "validation", batch_size: int = 256,
                 limit: int | None = None) -> dict:
        """Accuracy and mean cross-entropy over a whole split (the last partial batch included)."""
        arrays = self.arrays[split]
        n = len(arrays["labels"]) if limit is None else min(limit, len(arrays["labels"]))
        batch_size = min(batch_size, n)
        fn = jax.jit(lambda p, b: self.forward(lifted, p, b))
        correct, total_loss = 0, 0.0
        for s in range(0, n, batch_size):
            b = {k: v[s:min(s + batch_size, n)] for k, v in arrays.items()}
            real = len(b["labels"])
            if real < batch_size:  # pad to one shape: one compile
                b = {k: np.concatenate([v, np.repeat(v[-1:], batch_size - real, 0)]) for k, v in b.items()}
            logits = np.asarray(fn(params, b), np.float32)[:real]
            labels = b["labels"][:real]
            correct += int((logits.argmax(-1) == labels).sum())
            total_loss += float(optax.softmax_cross_entropy_with_integer_labels(logits, labels).sum())
        return {"accuracy": correct / n, "loss": total_loss / n, "examples": n}


def make_task(model: str, data: str, **kw):
    """The task for a model name and a data name (see the module docstring)."""
    if model == "minilm":
        return ClassificationTask(data=data, **kw)
    if model == "smollm2":
        from jlora.tasks_lm import InstructionTask  # noqa: WPS433 (heavy: GGUF)

        return InstructionTask(data=data, **kw)
    raise ValueError(f"unknown model {model!r}; choose one of {MODELS}")
