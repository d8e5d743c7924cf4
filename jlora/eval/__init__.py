"""Know what you trained: task metrics, a forgetting check, a generalisation probe and a blind
human review sheet for a fine-tune (:mod:`jlora.eval.protocol`), and the metrics themselves
(:mod:`jlora.eval.metrics`).

    report = jlora.eval.evaluate(task, lifted, adapted, base, jlora.eval.EvalOptions(review=10))
    report = jlora.cli.evaluate_run("runs/my-run")    # a run directory: what `jlora evaluate --run` does
"""

from __future__ import annotations

from jlora.eval.metrics import (classification_metrics, confusion_matrix, exact_match, generation_metrics,
                                normalize_answer, token_f1)
from jlora.eval.protocol import EvalOptions, evaluate, load_probes, load_variants, report_markdown
from jlora.eval.review import read_scores, write_sheet

__all__ = ["EvalOptions", "classification_metrics", "confusion_matrix", "evaluate", "exact_match",
           "generation_metrics", "load_probes", "load_variants", "normalize_answer", "read_scores", "report_markdown",
           "token_f1", "write_sheet"]
