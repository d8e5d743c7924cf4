"""``jlora analyze``: the LoRA paper's §7 analysis of a run's adapter (:mod:`jlora.analysis`).

Examples::

    jlora analyze --run runs/rt-lora                        # spectrum, ranks, amplification per layer
    jlora analyze --run runs/r8 --compare runs/r64 --top-r 8 # + φ between the two runs' A factors
    jlora analyze --run runs/rt-lora --json > report.json

Writes ``analysis.json`` (:func:`jlora.analysis.analyze`'s report, with the runs named) and the PNG
plots of :func:`jlora.analysis.plot` into ``--out`` (default ``<run>/analysis``) and prints a table:
per layer the adapter's rank, the effective rank of ΔW, ``||ΔW||_F`` and the amplification factor.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

from jlora import analysis
from jlora.core.api import expand
from jlora.core.nodes import is_adapter_leaf, is_node
from jlora.core.paths import flatten_with_paths
from jlora.core.state import rewrites_base


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Adds the ``analyze`` subcommand to ``subparsers`` (an ``argparse`` sub-parsers action)."""
    p = subparsers.add_parser("analyze", help="what the adapter learned: spectrum and effective rank of each ΔW, "
                                              "amplification of W's directions, φ between two runs (LoRA paper §7)")
    p.add_argument("--run", required=True, help="the run directory to analyze")
    p.add_argument("--compare", help="a second run of the same model (another rank or seed): adds the subspace "
                                     "similarity φ of the two runs' A factors")
    p.add_argument("--out", help="where analysis.json and the plots go (default <run>/analysis)")
    p.add_argument("--top-r", type=int, help="project W on ΔW's top N directions (default: each layer's adapter rank)")
    p.add_argument("--json", action="store_true", help="print the JSON report instead of the table")
    return p


def _adapted_nodes(adapted) -> list:
    flat, _ = flatten_with_paths(expand(adapted), is_leaf=is_adapter_leaf)
    return [leaf for _, leaf in flat if is_node(leaf) and leaf.active]


def _check_has_delta(run: str, cfg: dict, adapted) -> list:
    nodes = _adapted_nodes(adapted)
    if not nodes:
        raise SystemExit(f"jlora: {run} was trained with --method {cfg.get('method')!r}, which adapts no weight "
                         f"matrix: there is no ΔW to analyze (analyze needs a weight adapter: lora, qlora, dora, "
                         f"adalora, tcur or ia3)")
    return nodes


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def table(report: dict) -> str:
    """The per-layer summary the command prints: rank, effective rank, ``||ΔW||_F``, amplification
    (and ``φ(1, 1)`` / ``φ(r, r)`` with a comparison)."""
    sim = report.get("similarity")
    head = ["layer", "rank", "eff. rank", "||dW||_F", "amplif."] + (["phi(1,1)", "phi(r,r)"] if sim is not None else [])
    rows = []
    for key, layer in report["layers"].items():
        amp = layer.get("amplification") or {}
        row = [key, str(layer["rank"]), _fmt(layer["effective_rank"], ".2f"), _fmt(layer["dw_norm"], ".3g"),
               _fmt(amp.get("amplification"), ".2f")]
        if sim is not None:
            grid = (sim.get(key) or {}).get("grid")
            if grid:
                r = min(len(grid), len(grid[0]))
                row += [_fmt(grid[0][0], ".2f"), _fmt(grid[r - 1][r - 1], ".2f")]
            else:
                row += ["-", "-"]
        rows.append(row)
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows])


def main(args: argparse.Namespace, load_run) -> int:
    """Runs ``jlora analyze`` for parsed ``args`` (see :func:`add_parser`); returns the exit status.
    ``load_run(dir) -> (config, task, adapted)`` is :func:`jlora.cli._load_run` (passed in: jlora.cli
    imports this module)."""
    if args.top_r is not None and args.top_r < 1:
        raise SystemExit(f"jlora: --top-r must be a positive number of directions, got {args.top_r}")
    cfg, task, adapted = load_run(args.run)
    nodes = _check_has_delta(args.run, cfg, adapted)
    # PiSSA / OLoRA keep a residual as the frozen base: ΔW is measured from the pretrained weights
    base_params = task.params if any(rewrites_base(m) for n in nodes for _, m in n.adapters) else None
    other = None
    if args.compare:
        cfg2, _, other = load_run(args.compare)
        if str(cfg2.get("model")) != str(cfg.get("model")):
            raise SystemExit(f"jlora: --compare {args.compare} fine-tunes the model {cfg2.get('model')!r}, but --run "
                             f"{args.run} fine-tunes {cfg.get('model')!r}; φ compares adapters of the same model")
        _check_has_delta(args.compare, cfg2, other)
    try:
        report = analysis.analyze(adapted, other=other, top_r=args.top_r, base_params=base_params,
                                  seed=int(cfg.get("seed") or 0))
    except ValueError as e:
        raise SystemExit(f"jlora: cannot analyze {args.run}: {e}") from None
    if other is not None and not report["similarity"]:   # the report says why per layer; say it once here
        reasons = sorted(set(report["similarity_skipped"].values()))
        print(f"jlora: no φ: {args.run} and {args.compare} share no layer with a low-rank factor "
              f"({'; '.join(reasons)})", file=sys.stderr)
    report = {"run": str(args.run), "compare": None if args.compare is None else str(args.compare),
              "model": cfg.get("model"), "method": cfg.get("method"), **report}
    out = pathlib.Path(args.out) if args.out else pathlib.Path(args.run) / "analysis"
    out.mkdir(parents=True, exist_ok=True)
    (out / "analysis.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    plots = analysis.plot(report, out)
    if args.json:
        print(json.dumps(report, indent=2, ensure_ascii=False))
        return 0
    print(table(report))
    print(f"wrote {out / 'analysis.json'} and {', '.join(pathlib.Path(p).name for p in plots)}")
    return 0
