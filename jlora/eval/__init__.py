"""Know what you trained: task metrics, a forgetting check, a generalisation probe and a blind
human review sheet for a fine-tune (:mod:`jlora.eval.protocol`), and the metrics themselves
(:mod:`jlora.eval.metrics`).

    report = jlora.eval.evaluate_run("runs/my-run")          # what `jlora evaluate --run` does
    report = jlora.eval.evaluate(task, lifted, adapted, base, jlora.eval.EvalOptions(review=10))
"""

from __future__ import annotations

import json
import pathlib

from jlora.eval.metrics import (classification_metrics, confusion_matrix, exact_match, generation_metrics,
                                normalize_answer, token_f1)
from jlora.eval.protocol import EvalOptions, evaluate, load_probes, load_variants, report_markdown
from jlora.eval.review import read_scores, write_sheet

__all__ = ["EvalOptions", "classification_metrics", "confusion_matrix", "evaluate", "evaluate_run", "exact_match",
           "generation_metrics", "load_probes", "load_variants", "normalize_answer", "read_scores", "report_markdown",
           "token_f1", "write_sheet"]


def evaluate_run(run, options: EvalOptions | None = None, out_dir=None) -> dict:
    """:func:`evaluate` on a finished ``jlora train`` run directory: its final (or best) adapter
    against the pretrained weights it was trained from, the report written to ``out_dir`` (default
    ``<run>/evaluation``) as ``evaluation.json`` and ``evaluation.md`` beside the plots and the
    review sheet."""
    import jlora
    from jlora.cli import _cast_frozen, _load_run, check_data_unchanged

    cfg, task, adapted = _load_run(str(run))
    check_data_unchanged(run, task)
    base = _cast_frozen(task.params, cfg["param_dtype"], task.head) if (options or EvalOptions()).base else None
    out = pathlib.Path(out_dir) if out_dir is not None else pathlib.Path(run) / "evaluation"
    report = evaluate(task, jlora.lift(task.model.apply), adapted, base, options, out)
    report["run"] = str(run)
    report["base_model"] = {"model": cfg["model"], "weights": f"the pretrained weights as trained on ({cfg['param_dtype']})"
                            + ("; its classification head is the untrained one the run started from"
                               if task.kind == "classification" else "")}
    title = f"evaluation of {pathlib.Path(run).name}: {cfg['method']} on {pathlib.Path(str(cfg['model'])).name} / " \
            f"{pathlib.Path(str(cfg['data'])).name}"
    (out / "evaluation.md").write_text(report_markdown(report, title))
    tmp = out / "evaluation.json.tmp"
    tmp.write_text(json.dumps(report, indent=2, default=str) + "\n")
    tmp.replace(out / "evaluation.json")
    return report
