"""Task metrics: classification (accuracy, macro-F1, per-class precision / recall, confusion
matrix) and generation (exact match, token F1, ROUGE-L, BLEU, chrF).

Which implementation, and why:

* **BLEU and chrF** come from `sacrebleu <https://github.com/mjpost/sacrebleu>`_, the reference
  implementation the field reports with (Post 2018, "A Call for Clarity in Reporting BLEU
  Scores"): its own tokeniser (``13a``), corpus-level statistics, multi-reference support, and a
  signature that pins every setting. Scores are on sacrebleu's 0-100 scale.
* **ROUGE-L** comes from Google Research's `rouge-score <https://pypi.org/project/rouge-score/>`_,
  the package that re-implements the original Perl ROUGE-1.5.5 and that Hugging Face ``evaluate``
  wraps: lower-cased alphanumeric tokens, sentence-level LCS F-measure, best reference taken, Porter
  stemming on (as ``evaluate`` does). Reported on 0-1, averaged over examples.
* **Exact match and token F1** follow the SQuAD v1.1 evaluation script (Rajpurkar et al. 2016),
  which is not a package: answers are normalised (lower case, punctuation and the articles a / an /
  the removed, whitespace collapsed), F1 is over the multiset of normalised tokens, the best
  reference counts. That script is twenty lines; it is written out here and tested against values
  worked by hand.
* **Classification** metrics are counts over a confusion matrix (numpy); the tests check them
  against scikit-learn's ``precision_recall_fscore_support`` (a test-only dependency).
"""

from __future__ import annotations

import collections
import re
import string
from typing import Sequence

import numpy as np

#: the generation metrics :func:`generation_metrics` reports (larger is better for each)
GENERATION_METRICS = ("exact_match", "token_f1", "rougeL", "bleu", "chrf")

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = set(string.punctuation)


# ------------------------------------------------------------------------------------------------
# classification

def confusion_matrix(labels: Sequence[int], predictions: Sequence[int], num_classes: int) -> np.ndarray:
    """``(num_classes, num_classes)`` counts: row = true class, column = predicted class."""
    labels, predictions = np.asarray(labels, np.int64), np.asarray(predictions, np.int64)
    if labels.shape != predictions.shape or labels.ndim != 1:
        raise ValueError(f"labels {labels.shape} and predictions {predictions.shape} must be 1-D and equal in length")
    for name, v in (("labels", labels), ("predictions", predictions)):
        if v.size and (v.min() < 0 or v.max() >= num_classes):
            raise ValueError(f"{name} hold class {int(v.min() if v.min() < 0 else v.max())}; expected 0..{num_classes - 1}")
    cm = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(cm, (labels, predictions), 1)
    return cm


def classification_metrics(labels: Sequence[int], predictions: Sequence[int], names: Sequence[str]) -> dict:
    """Accuracy, macro-F1 (the unweighted mean of per-class F1), per-class precision / recall / F1 /
    support and the confusion matrix (row = true class). A class that is never predicted has
    precision 0, one that never occurs has recall 0 (scikit-learn's ``zero_division=0``); macro
    averages run over every class in ``names``."""
    names = [str(n) for n in names]
    cm = confusion_matrix(labels, predictions, len(names))
    tp = np.diag(cm).astype(np.float64)
    predicted, support = cm.sum(0).astype(np.float64), cm.sum(1).astype(np.float64)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    n = int(cm.sum())
    return {
        "accuracy": float(tp.sum() / n) if n else 0.0,
        "macro_f1": float(f1.mean()), "macro_precision": float(precision.mean()), "macro_recall": float(recall.mean()),
        "per_class": {name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
                      for name, p, r, f, s in zip(names, precision, recall, f1, support)},
        "confusion_matrix": cm.tolist(), "labels": names, "examples": n,
    }


def plot_confusion(cm, names: Sequence[str], path: str, title: str = "confusion matrix") -> str:
    """A confusion-matrix heatmap with counts in the cells (rows: true, columns: predicted)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(cm)
    size = max(3.5, 0.6 * len(names) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    top = cm.max() if cm.size else 0
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > top / 2 else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------
# generation

def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, punctuation and articles removed, whitespace collapsed."""
    text = "".join(ch for ch in str(text).lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    """F1 over the multiset of normalised tokens (SQuAD v1.1). Two empty answers score 1."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((collections.Counter(pred) & collections.Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def _references(references) -> list[list[str]]:
    """Each example's references as a non-empty list of strings."""
    out = []
    for i, r in enumerate(references):
        refs = [r] if isinstance(r, str) else [str(x) for x in r]
        if not refs:
            raise ValueError(f"example {i} has no reference")
        out.append(refs)
    return out


def generation_metrics(predictions: Sequence[str], references, *, per_example: bool = False) -> dict:
    """Exact match, token F1, ROUGE-L (F-measure, 0-1; means over examples, best reference each)
    and corpus BLEU / chrF (sacrebleu, 0-100). ``references[i]`` is a string or a list of
    acceptable answers. With ``per_example`` the per-example EM / F1 / ROUGE-L lists come back too."""
    from rouge_score import rouge_scorer
    from sacrebleu.metrics import BLEU, CHRF

    predictions = [str(p) for p in predictions]
    refs = _references(references)
    if len(predictions) != len(refs):
        raise ValueError(f"{len(predictions)} predictions for {len(refs)} references")
    if not predictions:
        raise ValueError("generation_metrics needs at least one example")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    em = [max(exact_match(p, r) for r in rs) for p, rs in zip(predictions, refs)]
    f1 = [max(token_f1(p, r) for r in rs) for p, rs in zip(predictions, refs)]
    rouge = [scorer.score_multi(rs, p)["rougeL"].fmeasure for p, rs in zip(predictions, refs)]
    # sacrebleu takes reference *streams*; an example with fewer references repeats its first one,
    # which changes neither BLEU's clipped counts nor chrF's best-reference choice
    width = max(len(r) for r in refs)
    streams = [[rs[k] if k < len(rs) else rs[0] for rs in refs] for k in range(width)]
    bleu, chrf = BLEU(), CHRF()
    out = {
        "exact_match": float(np.mean(em)), "token_f1": float(np.mean(f1)), "rougeL": float(np.mean(rouge)),
        "bleu": float(bleu.corpus_score(predictions, streams).score),
        "chrf": float(chrf.corpus_score(predictions, streams).score),
        "examples": len(predictions),
        "signatures": {"bleu": str(bleu.get_signature()), "chrf": str(chrf.get_signature()),
                       "rougeL": "rouge-score rougeL, use_stemmer=True, F-measure, best reference"},
    }
    if per_example:
        out["per_example"] = {"exact_match": em, "token_f1": f1, "rougeL": rouge}
    return out
