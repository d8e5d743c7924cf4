"""``jlora evaluate``: the evaluation protocol (:mod:`jlora.eval`) on a finished run, or the summary
of a filled-in review sheet (``--read-scores``)."""

from __future__ import annotations

import json
import pathlib

from jlora import eval as jeval
from jlora.cli.options import add_decoding_args


def add_parser(sub) -> None:
    p = sub.add_parser("evaluate", help="task metrics (base vs adapted), forgetting and generalisation checks, and a "
                                        "blind human review sheet for a finished run")
    p.add_argument("--run", required=True, help="a finished jlora train run directory")
    p.add_argument("--out", help="where the report goes (default RUN/evaluation)")
    p.add_argument("--split", default="test", choices=("train", "validation", "test"))
    p.add_argument("--limit", type=int, help="rows of the split for the loss / classification metrics (default all)")
    p.add_argument("--generate-limit", type=int, default=64, help="prompts decoded for generation metrics (default 64)")
    add_decoding_args(p)
    p.add_argument("--no-base", action="store_true", help="skip the base model (and so the forgetting check)")
    p.add_argument("--no-forgetting", action="store_true", help="skip the forgetting check")
    p.add_argument("--general-text", help="general text for the forgetting check: a .txt file (one passage a line) "
                                          "or a data file with a text column (default: a corpus shipped offline)")
    p.add_argument("--general-passages", type=int, default=32, help="passages of general text scored (default 32)")
    p.add_argument("--ppl-threshold", type=float, default=1.10,
                   help="LM runs: fail the forgetting check above this adapted / base perplexity ratio (default 1.10)")
    p.add_argument("--drift-threshold", type=float, default=0.10,
                   help="classifier runs: fail above this embedding drift, 1 - mean cosine (default 0.10)")
    p.add_argument("--probes", help="probe prompts for the forgetting check (JSON like jlora/eval/probes.json, or .txt)")
    p.add_argument("--variants", help="re-phrasings for the generalisation probe (JSON like jlora/eval/variants.json)")
    p.add_argument("--review", type=int, default=20, help="examples on the blind review sheet (default 20; 0: none)")
    p.add_argument("--read-scores", metavar="FILE",
                   help="summarise a filled-in review_scores.csv (or review.md) of this run instead of evaluating")
    p.add_argument("--strict", action="store_true", help="exit 1 when the forgetting check fails")


def main(args, evaluate_run) -> int:
    """``jlora evaluate`` for parsed ``args``; ``evaluate_run`` is :func:`jlora.cli.evaluate_run`
    (passed in: jlora.cli imports this module)."""
    out = pathlib.Path(args.out) if args.out else pathlib.Path(args.run) / "evaluation"
    if args.read_scores:
        scores = pathlib.Path(args.read_scores)
        try:
            summary = jeval.read_scores(scores, out / "review_key.json")
        except ValueError as e:
            raise SystemExit(f"jlora: {e}") from None
        (out / "review_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(jeval.review.scores_markdown(summary), end="")
        return 0
    try:
        options = jeval.EvalOptions(
            split=args.split, limit=args.limit, generate_limit=args.generate_limit, max_new_tokens=args.max_new_tokens,
            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed, batch=args.batch,
            base=not args.no_base, forgetting=not args.no_forgetting, general_text=args.general_text,
            general_passages=args.general_passages, ppl_threshold=args.ppl_threshold,
            drift_threshold=args.drift_threshold, probes=args.probes, variants=args.variants, review=args.review)
        report = evaluate_run(args.run, options, out)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"jlora: evaluate: {e}") from None
    print((out / "evaluation.md").read_text(), end="")
    print(f"\nwrote {out / 'evaluation.json'} and {out / 'evaluation.md'}")
    forgot = report.get("forgetting", {})
    return 1 if args.strict and forgot.get("passed") is False else 0
