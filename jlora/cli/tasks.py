"""Model + data + loss + evaluation bundles used by the ``jlora`` CLI and the examples.

A task knows how to build the (pretrained) model and its params, the tokenised splits, the
loss for :func:`jlora.train.make_step`, and an evaluation on a split.

Models: the bundled ``minilm`` (BERT encoder, sequence classification) and ``smollm2`` (Llama
decoder, instruction tuning), or a local checkpoint: a Hugging Face directory (``config.json`` +
safetensors + ``tokenizer.json``) whose ``model_type`` is a BERT encoder (classification) or a
Llama / Mistral / Qwen2 decoder (language modelling) or a ViT (image classification), or a Llama /
Qwen2 ``.gguf`` file.

Data: the bundled ``rotten_tomatoes``, ``bbc_news`` (classification), ``chatterbot``,
``natural_instructions:<subtask>`` (instructions), or a local CSV / TSV / JSON / JSONL / Parquet
file (:mod:`jlora.data.files`): ``text`` + ``label`` columns for an encoder, ``image`` (paths) +
``label`` for a ViT; ``messages`` (chat),
``prompt`` + ``response`` (or ``instruction`` [+ ``input``] + ``output`` ...) or ``text`` for a decoder.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import json
import pathlib
from jlora import data as jdata
from jlora.data import files
from jlora.models import bert
from jlora.methods.prompt import prompt_kwargs
from jlora.data import tokenize_classification
from jlora.cli.options import DATA_OPTIONS, check_unsealed
from jlora.eval.metrics import classification_metrics
from jlora.cli.tasks_lm import InstructionTask
from jlora.models import vit

CLASSIFICATION_DATA = ("rotten_tomatoes", "bbc_news")
MODELS = ("minilm", "smollm2")
#: config.json ``model_type`` -> the jlora model family that runs it
FAMILIES = {"bert": "bert", "llama": "llama", "mistral": "llama", "qwen2": "llama", "vit": "vit"}


class ModelError(ValueError):
    """A ``--model`` that is neither a bundled name nor a checkpoint jlora can run."""


def resolve_model(name: str) -> tuple[str, str | None]:
    """``(family, path)`` for a model name: ``("bert", None)`` for ``minilm``, ``("llama", "smollm2")``
    for ``smollm2``, else the family read from a directory's ``config.json`` (``model_type``) or a
    ``.gguf`` file. Anything else raises :class:`ModelError` naming what is supported."""

    if name == "minilm":
        return "bert", None
    if name == "smollm2":
        return "llama", "smollm2"
    path = pathlib.Path(name)
    supported = (f"a bundled name {MODELS}, a .gguf file (llama / qwen2), or a Hugging Face directory whose "
                 f"config.json model_type is one of {sorted(FAMILIES)}")
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"model file {path} does not exist")
        return "llama", str(path)
    if not path.exists():
        raise ModelError(f"model {name!r} is not {supported}: no such file or directory")
    if not (path / "config.json").is_file():
        raise ModelError(f"model {path} has no config.json; expected {supported}")
    try:
        config = json.loads((path / "config.json").read_text())
        model_type = config.get("model_type")
    except (ValueError, AttributeError) as e:
        raise ModelError(f"{path / 'config.json'} is not a JSON object: {e}") from None
    if model_type not in FAMILIES:
        raise ModelError(f"{path / 'config.json'} has model_type={model_type!r} "
                         f"(architectures {config.get('architectures')}); jlora runs {sorted(FAMILIES)}")
    if FAMILIES[model_type] == "vit":
        return "vit", str(path)
    if not (path / "tokenizer.json").is_file():
        raise ModelError(f"{path} has no tokenizer.json (a fast tokenizer file); the CLI needs one to read text")
    return FAMILIES[model_type], str(path)


@dataclasses.dataclass
class ClassificationTask:
    """MiniLM (BERT) + a new classification head on a real text-classification set."""

    data: str = "rotten_tomatoes"
    max_length: int = 48
    seed: int = 0
    scan_layers: bool = False
    model_path: str | None = None      # a Hugging Face BERT directory; None: the bundled MiniLM
    remat: bool | str = False          # recompute each layer in the backward pass (or a policy name)
    options: dict | None = None        # DATA_OPTIONS for a data file

    kind = "classification"
    family = "bert"
    peft_task_type = "SEQ_CLS"     # PEFT files: PeftModelForSequenceClassification (needed for prompts)

    def __post_init__(self):

        opts = {**DATA_OPTIONS, **(self.options or {})}
        text_col, label_col = opts["text_column"] or "text", opts["label_column"] or "label"
        if self.data in CLASSIFICATION_DATA:
            loader = {"rotten_tomatoes": jdata.rotten_tomatoes, "bbc_news": jdata.bbc_news}[self.data]
            self.splits = loader(seed=self.seed)
            text_col, label_col = "text", "label"
        elif files.looks_like_file(self.data):
            self.splits = files.labelled_splits(self.data, opts["validation_file"], opts["test_file"], seed=self.seed,
                                                input_column=text_col, label_column=label_col,
                                                flags=("--text-column", "--label-column"))
        else:
            raise ValueError(f"data {self.data!r} is not a classification set; choose one of {CLASSIFICATION_DATA} "
                             "or give a CSV / TSV / JSON / JSONL / Parquet file")
        self.label_names = self.splits["train"].features[label_col].names
        self.input_column, self.label_column = text_col, label_col
        self.model, self.params, self.tokenizer = bert.load_pretrained(
            self.model_path, num_labels=len(self.label_names), scan_layers=self.scan_layers, seed=self.seed,
            remat=self.remat)
        self.arrays = jdata.tokenize_classification(self.splits, self.tokenizer, self.max_length,
                                                    text_column=text_col, label_column=label_col)
        for name, a in self.arrays.items():   # a tokenizer that does not fit the checkpoint: say so, not NaN
            try:
                bert.check_inputs(self.model.config, a["input_ids"], a["attention_mask"], a["token_type_ids"])
            except ValueError as e:
                raise ValueError(f"{name} split: the tokenizer's ids do not fit the model: {e}") from None
        self.targets = dict(bert.DEFAULT_TARGETS)
        self.exclude = {"all-linear": bert.ALL_LINEAR_EXCLUDE}
        self.head = r".*/classifier/(kernel|bias)"
        self.naming = lambda path, layer=None: bert.hf_module_name(path, layer, prefix="bert.")

    # -- model functions ------------------------------------------------------------------------
    def example(self):
        a = self.arrays["train"]
        return (a["input_ids"][:2], a["attention_mask"][:2], a["token_type_ids"][:2])

    def forward(self, lifted: Callable, params, batch, train: bool = False, key=None):

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
        """Accuracy, macro-F1 and mean cross-entropy over a whole split (the last partial batch
        included). The test split is sealed while a run trains (:func:`check_unsealed`)."""
        check_unsealed(self, split)
        arrays = self.arrays[split]
        n = len(arrays["labels"]) if limit is None else min(limit, len(arrays["labels"]))
        total_loss, predictions = 0.0, []
        for s, logits in self._logits(lifted, params, arrays, n, batch_size):
            labels = arrays["labels"][s:s + len(logits)]
            predictions.append(logits.argmax(-1))
            total_loss += float(optax.softmax_cross_entropy_with_integer_labels(logits, labels).sum())
        predictions = np.concatenate(predictions)
        scores = classification_metrics(arrays["labels"][:n], predictions, self.label_names)
        return {"accuracy": scores["accuracy"], "macro_f1": scores["macro_f1"], "loss": total_loss / n, "examples": n}

    def inputs(self, split: str) -> list[str]:
        """The split's raw inputs (texts, or image paths as the data file gives them), row by row."""
        check_unsealed(self, split)
        return [str(t) for t in self.splits[split][self.input_column]]

    def _logits(self, lifted: Callable, params, arrays, n: int, batch_size: int):
        """Yields ``(start, float32 logits)`` for the first ``n`` rows of ``arrays`` in batches padded
        to one shape (one compile; the padding rows' logits are dropped)."""
        batch_size = min(batch_size, n)
        fn = jax.jit(lambda p, b: self.forward(lifted, p, b))
        for s in range(0, n, batch_size):
            b = {k: v[s:min(s + batch_size, n)] for k, v in arrays.items()}
            real = min(batch_size, n - s)
            if real < batch_size:
                b = {k: np.concatenate([v, np.repeat(v[-1:], batch_size - real, 0)]) for k, v in b.items()}
            yield s, np.asarray(fn(params, b), np.float32)[:real]

    def _probabilities(self, lifted: Callable, params, arrays, batch_size: int) -> np.ndarray:
        n = len(next(iter(arrays.values())))
        return np.concatenate([np.asarray(jax.nn.softmax(logits, -1))
                               for _, logits in self._logits(lifted, params, arrays, n, batch_size)])

    def predict(self, lifted: Callable, params, texts, batch_size: int = 64) -> np.ndarray:
        """Class probabilities ``(len(texts), num_labels)`` for raw texts, tokenised as in training
        (truncated / padded to ``max_length``); columns follow :attr:`label_names`."""

        texts = [str(t) for t in texts]
        if not texts:
            raise ValueError("predict needs at least one text")
        arrays = tokenize_classification({"x": {"text": texts, "label": [0] * len(texts)}}, self.tokenizer,
                                         self.max_length)["x"]
        return self._probabilities(lifted, params, arrays, batch_size)


def make_task(model: str, data: str, *, options: dict | None = None, param_dtype=None, **kw):
    """The task for a model (a bundled name or a local checkpoint) and data (a bundled name or a
    file); ``options`` are :data:`DATA_OPTIONS` (see the module docstring). ``param_dtype``: a
    decoder's weights are read in this dtype, tensor by tensor (an encoder loads in float32: its new
    head must stay float32; cast the rest afterwards)."""
    family, path = resolve_model(model)
    decoder = {k: kw.pop(k) for k in ("loss_chunk", "attention", "fuse_projections") if k in kw}
    if family != "llama":
        if decoder.get("loss_chunk"):
            raise ValueError(f"loss_chunk={decoder['loss_chunk']}: a chunked loss is for causal LMs (a Llama-family "
                             f"decoder); model {model!r} is a {family} classifier (its loss is over a handful of labels)")
        if decoder.get("attention") not in (None, "explicit") or decoder.get("fuse_projections"):
            raise ValueError(f"attention={decoder.get('attention')!r} / fuse_projections="
                             f"{decoder.get('fuse_projections')}: these are options of the Llama-family decoders; "
                             f"model {model!r} is a {family} model")
    if family == "vit":
        return ImageClassificationTask(data=data, model_path=path, options=options, **kw)
    if family == "bert":
        return ClassificationTask(data=data, model_path=path, options=options, **kw)

    return InstructionTask(data=data, model_path=path, options=options, param_dtype=param_dtype, **decoder, **kw)


def _resample(name_or_code) -> int:
    from PIL import Image

    codes = {0: Image.Resampling.NEAREST, 1: Image.Resampling.LANCZOS, 2: Image.Resampling.BILINEAR,
             3: Image.Resampling.BICUBIC}
    return codes.get(int(name_or_code) if isinstance(name_or_code, int) else 2, Image.Resampling.BILINEAR)


@dataclasses.dataclass
class ImageClassificationTask(ClassificationTask):
    """A Hugging Face ViT directory + a new (or its own) classification head on a data file whose
    ``image`` column holds image paths (relative to the file, or absolute) and ``label`` column the
    classes (``--image-column`` / ``--label-column``). Images are read with Pillow, converted to RGB,
    resized as the checkpoint's ``preprocessor_config.json`` says (default: the model's image size,
    bilinear), kept as uint8 and normalised in the jitted forward (``image_mean`` / ``image_std``,
    default 0.5 / 0.5, as transformers' ``ViTImageProcessor``)."""

    family = "vit"
    peft_task_type = None

    def __post_init__(self):


        opts = {**DATA_OPTIONS, **(self.options or {})}
        image_col, label_col = opts["image_column"] or "image", opts["label_column"] or "label"
        if not files.looks_like_file(self.data):
            raise ValueError(f"a ViT model needs a data file with {image_col!r} (image paths) and {label_col!r} "
                             f"columns; got data {self.data!r}")
        self.splits = files.labelled_splits(self.data, opts["validation_file"], opts["test_file"], seed=self.seed,
                                            input_column=image_col, label_column=label_col,
                                            flags=("--image-column", "--label-column"))
        self.label_names = self.splits["train"].features[label_col].names
        self.input_column, self.label_column = image_col, label_col
        self.model, self.params = vit.load_pretrained(self.model_path, num_labels=len(self.label_names),
                                                      scan_layers=self.scan_layers, seed=self.seed,
                                                      remat=self.remat)
        self.tokenizer = None
        cfg = self.model.config
        pre = pathlib.Path(self.model_path) / "preprocessor_config.json"
        pre = json.loads(pre.read_text()) if pre.is_file() else {}
        size = pre.get("size") or {}
        self.image_hw = (int(size.get("height", cfg.image_hw[0])), int(size.get("width", cfg.image_hw[1]))) \
            if pre.get("do_resize", True) else cfg.image_hw
        if self.image_hw != tuple(cfg.image_hw):
            raise ValueError(f"{pre and 'preprocessor_config.json'} resizes to {self.image_hw}, the model takes "
                             f"{tuple(cfg.image_hw)}")
        norm = pre.get("do_normalize", True)
        self.mean = np.asarray(pre.get("image_mean", [0.5] * 3) if norm else [0.0] * 3, np.float32)
        self.std = np.asarray(pre.get("image_std", [0.5] * 3) if norm else [1.0] * 3, np.float32)
        self.rescale = float(pre.get("rescale_factor", 1 / 255)) if pre.get("do_rescale", True) else 1.0
        self.resample = _resample(pre.get("resample", 2))
        base = pathlib.Path(self.data).resolve().parent
        self.arrays = {name: {"pixels": self.read_images(ds[image_col], base),
                              "labels": np.asarray(ds[label_col], np.int32)} for name, ds in self.splits.items()}
        self.targets = dict(vit.DEFAULT_TARGETS)
        self.exclude = {"all-linear": vit.ALL_LINEAR_EXCLUDE}
        self.head = r".*/classifier/(kernel|bias)"
        self.naming = lambda path, layer=None: vit.hf_module_name(path, layer, prefix="vit.")

    def read_images(self, paths, base=None) -> np.ndarray:
        """uint8 ``(n, height, width, 3)`` for image files (paths relative to ``base``)."""

        from PIL import Image, UnidentifiedImageError

        out = np.zeros((len(paths),) + tuple(self.image_hw) + (3,), np.uint8)
        for i, p in enumerate(paths):
            path = pathlib.Path(str(p))
            path = path if path.is_absolute() or base is None else base / path
            try:
                with Image.open(path) as im:
                    im = im.convert("RGB").resize((self.image_hw[1], self.image_hw[0]), self.resample)
                    out[i] = np.asarray(im, np.uint8)
            except (OSError, UnidentifiedImageError) as e:
                raise ValueError(f"row {i}: image {path} cannot be read ({type(e).__name__}: {e})") from None
        return out

    def example(self):
        return (self.normalise(self.arrays["train"]["pixels"][:2]),)

    def normalise(self, pixels):
        return (jnp.asarray(pixels, jnp.float32) * self.rescale - self.mean) / self.std

    def forward(self, lifted: Callable, params, batch, train: bool = False, key=None):
        kwargs = {}
        if train and key is not None:
            kwargs = dict(deterministic=False, rngs={"dropout": key}, jlora_rng=jax.random.fold_in(key, 1))
        return lifted(params, self.normalise(batch["pixels"]), **kwargs)

    def tokens_per_example(self) -> int:
        return int(self.model.config.seq_len)

    def predict(self, lifted: Callable, params, paths, batch_size: int = 64) -> np.ndarray:
        """Class probabilities for image files (columns follow :attr:`label_names`)."""
        return self._probabilities(lifted, params, {"pixels": self.read_images(list(paths))}, batch_size)
