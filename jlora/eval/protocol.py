"""The evaluation protocol of a finished fine-tune, in the order a fine-tune is judged:

1. **the task's own metric on the sealed test split**, base and adapted side by side
   (classification: accuracy, macro-F1, per-class precision / recall, confusion matrix; generation:
   exact match, token F1, ROUGE-L, BLEU, chrF of greedy or seeded sampled replies, and the held-out
   loss / perplexity);
2. **forgetting**: general ability before and after (:mod:`jlora.eval.forgetting`), and the
   answers of both models to a fixed set of general probe prompts;
3. **generalisation**: the task metric when the test inputs are re-phrased or carry a distractor
   (``variants.json``; extend it with your own file);
4. **a human look**: a blind review sheet of sampled test examples (:mod:`jlora.eval.review`).

Validation picks the checkpoint during training (``jlora train --eval-every K --best-metric M
--early-stopping P``); the test split stays sealed until the adapter is final and is read here.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import jax
import numpy as np
import optax

from jlora.eval import forgetting as fg
from jlora.eval import review as rv
from jlora.eval.metrics import GENERATION_METRICS, classification_metrics, generation_metrics, plot_confusion

_HERE = pathlib.Path(__file__).resolve().parent
@dataclasses.dataclass
class EvalOptions:
    """What :func:`evaluate` measures, and how much of it."""

    split: str = "test"
    limit: int | None = None            # rows of the split for loss / classification metrics (None: all)
    generate_limit: int = 64            # prompts decoded for generation metrics (and per variant)
    max_new_tokens: int = 64
    temperature: float = 0.0            # 0: greedy; > 0 samples with `seed`
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0
    batch: int = 8
    base: bool = True                   # also evaluate the base model, side by side
    forgetting: bool = True
    general_text: str | None = None     # a file replacing the default general corpus
    general_passages: int = 32
    general_max_length: int = 256
    ppl_threshold: float = 1.10         # LM: fail when adapted / base perplexity on general text exceeds it
    drift_threshold: float = 0.10       # encoder: fail when 1 - mean cosine exceeds it
    probes: str | None = None           # a probe file replacing probes.json
    variants: str | None = None         # a variants file replacing variants.json
    review: int = 20                    # examples on the review sheet (0: none)

    def __post_init__(self):
        for name in ("generate_limit", "max_new_tokens", "batch", "general_passages", "general_max_length"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.limit is not None and (not isinstance(self.limit, int) or self.limit < 1):
            raise ValueError(f"limit must be a positive integer or None, got {self.limit!r}")
        if not isinstance(self.review, int) or self.review < 0:
            raise ValueError(f"review must be an integer >= 0, got {self.review!r}")
        if self.temperature < 0 or (self.top_p is not None and not 0 < self.top_p <= 1):
            raise ValueError(f"temperature must be >= 0 and top_p in (0, 1], got {self.temperature}, {self.top_p}")
        if self.ppl_threshold < 1 or not 0 <= self.drift_threshold <= 2:
            raise ValueError(f"ppl_threshold must be >= 1 and drift_threshold in [0, 2], got {self.ppl_threshold}, "
                             f"{self.drift_threshold}")


# ------------------------------------------------------------------------------------------------
# probe and variant files

def load_probes(path: str | None = None) -> list[dict]:
    """Probe prompts: ``{"id", "prompt", "kind"?, "expect"?}`` from a JSON file (``{"probes": [...]}``
    or a list) or a .txt file (one prompt a line); the bundled ``probes.json`` by default."""
    path = pathlib.Path(path) if path else _HERE / "probes.json"
    if not path.is_file():
        raise ValueError(f"probe file {path} does not exist")
    if path.suffix == ".txt":
        return [{"id": f"p{i}", "prompt": line.strip()} for i, line in enumerate(path.read_text().splitlines())
                if line.strip()]
    data = json.loads(path.read_text())
    probes = data["probes"] if isinstance(data, dict) else data
    for i, p in enumerate(probes):
        if not isinstance(p, dict) or not str(p.get("prompt", "")).strip():
            raise ValueError(f"{path}: probe {i} has no 'prompt'; expected {{'id': ..., 'prompt': ..., "
                             f"'expect': [optional strings]}}")
        p.setdefault("id", f"p{i}")
    return probes


def load_variants(kind: str, path: str | None = None) -> list[dict]:
    """The variants of ``kind`` ("instruction" / "classification"): ``{"id", "template"
    (with {input}), "transform"?}``."""
    path = pathlib.Path(path) if path else _HERE / "variants.json"
    if not path.is_file():
        raise ValueError(f"variants file {path} does not exist")
    variants = json.loads(path.read_text()).get(kind, [])
    for i, v in enumerate(variants):
        if "{input}" not in str(v.get("template", "")):
            raise ValueError(f"{path}: {kind} variant {i} ({v.get('id')}) has template {v.get('template')!r}; "
                             "expected a string holding {input}")
        if v.get("transform") not in (None, "lower", "upper"):
            raise ValueError(f"{path}: {kind} variant {v.get('id')} has transform {v['transform']!r}; expected "
                             "'lower', 'upper' or none")
        v.setdefault("id", f"v{i}")
    return variants


def apply_variant(variant: dict, text: str) -> str:
    out = variant["template"].replace("{input}", text)
    return {"lower": str.lower, "upper": str.upper}.get(variant.get("transform"), lambda s: s)(out)


def _probe_hit(probe: dict, answer: str) -> bool | None:
    expect = probe.get("expect")
    return None if not expect else any(str(e).lower() in answer.lower() for e in expect)


def _sample(n: int, k: int, seed: int) -> list[int]:
    return sorted(np.random.default_rng(seed).choice(n, min(k, n), replace=False).tolist()) if n else []


# ------------------------------------------------------------------------------------------------
# classification

def _class_outputs(task, lifted, params, opts) -> tuple[np.ndarray, float, int]:
    arrays = task.arrays[opts.split]
    n = len(arrays["labels"]) if opts.limit is None else min(opts.limit, len(arrays["labels"]))
    logits = np.concatenate([lg for _, lg in task._logits(lifted, params, arrays, n, 64)])
    loss = float(optax.softmax_cross_entropy_with_integer_labels(logits, arrays["labels"][:n]).mean())
    return logits, loss, n


def _evaluate_classification(task, lifted, adapted, base, opts, out: pathlib.Path | None) -> dict:
    names = list(task.label_names)
    labels = np.asarray(task.arrays[opts.split]["labels"])
    models = {"adapted": adapted, **({"base": base} if base is not None else {})}
    report, probs = {"kind": "classification", "task": {}}, {}
    for name, params in models.items():
        logits, loss, n = _class_outputs(task, lifted, params, opts)
        probs[name] = np.asarray(jax.nn.softmax(logits, -1))
        report["task"][name] = {**classification_metrics(labels[:n], logits.argmax(-1), names), "loss": loss}
        if out is not None:
            report["task"][name]["confusion_plot"] = plot_confusion(
                report["task"][name]["confusion_matrix"], names, str(out / f"confusion_{name}.png"),
                f"{name}: {opts.split} split")
    n = report["task"]["adapted"]["examples"]
    inputs = task.inputs(opts.split)[:n]
    # generalisation: the same test rows re-phrased / with a distractor, the adapted model's metric
    if task.family == "bert":
        rows = []
        for v in load_variants("classification", opts.variants):
            p = task.predict(lifted, adapted, [apply_variant(v, t) for t in inputs], batch_size=64)
            m = classification_metrics(labels[:n], p.argmax(-1), names)
            rows.append({"id": v["id"], "template": v["template"], "transform": v.get("transform"),
                         "accuracy": m["accuracy"], "macro_f1": m["macro_f1"],
                         "accuracy_change": m["accuracy"] - report["task"]["adapted"]["accuracy"],
                         "macro_f1_change": m["macro_f1"] - report["task"]["adapted"]["macro_f1"]})
        report["generalisation"] = {"variants": rows, "examples": n}
    else:
        report["generalisation"] = {"skipped": "text variants do not apply to an image classifier"}
    if opts.forgetting:
        if task.family == "bert" and base is not None:
            texts = fg.read_texts(opts.general_text) if opts.general_text else fg.general_corpus(opts.general_passages)
            report["forgetting"] = {**fg.encoder_drift(task, base, adapted, texts[:opts.general_passages],
                                                       threshold=opts.drift_threshold),
                                    "corpus": opts.general_text or fg.CORPUS_SOURCE}
        else:
            report["forgetting"] = {"skipped": "needs the base model (--no-base given)" if base is None else
                                    "no general image corpus ships offline; the encoder drift check is for text"}
    if opts.review and out is not None:
        picks = _sample(n, opts.review, opts.seed)

        def said(name, i):
            if name not in probs:
                return "(base not evaluated)"
            k = int(probs[name][i].argmax())
            return f"{names[k]} (p={probs[name][i][k]:.2f})"

        rows = [{"id": f"{opts.split}-{i}", "input": inputs[i], "reference": names[int(labels[i])],
                 "base": said("base", i), "adapted": said("adapted", i)} for i in picks]
        report["review_sheet"] = rv.write_sheet(out, rows, title=f"review: {len(rows)} {opts.split} examples",
                                                seed=opts.seed)
    return report


# ------------------------------------------------------------------------------------------------
# generation

def _generate(task, lifted, params, prompts, opts) -> list[str]:
    return task.replies(lifted, params, prompts, opts.max_new_tokens, batch_size=opts.batch,
                        temperature=opts.temperature, top_k=opts.top_k, top_p=opts.top_p, seed=opts.seed)


def _evaluate_generation(task, lifted, adapted, base, opts, out: pathlib.Path | None) -> dict:
    models = {"adapted": adapted, **({"base": base} if base is not None else {})}
    report = {"kind": "generation", "task": {name: task.evaluate(lifted, p, opts.split, limit=opts.limit)
                                             for name, p in models.items()},
              "decoding": {"temperature": opts.temperature, "top_k": opts.top_k, "top_p": opts.top_p,
                           "seed": opts.seed, "max_new_tokens": opts.max_new_tokens}}
    pairs = task.reference_pairs(opts.split)[:opts.generate_limit]
    replies = {}
    if pairs:
        prompts, refs = [p for p, _ in pairs], [r for _, r in pairs]
        for name, params in models.items():
            replies[name] = _generate(task, lifted, params, prompts, opts)
            scores = generation_metrics(replies[name], refs)
            report["task"][name].update({k: scores[k] for k in GENERATION_METRICS}, prompts_decoded=len(prompts),
                                        signatures=scores["signatures"])
        report["outputs"] = [{"prompt": p, "references": r, **{name: replies[name][i] for name in replies}}
                             for i, (p, r) in enumerate(pairs)]
        rows = []
        for v in load_variants("instruction", opts.variants):
            scores = generation_metrics(_generate(task, lifted, adapted, [apply_variant(v, p) for p in prompts], opts),
                                        refs)
            rows.append({"id": v["id"], "template": v["template"], "transform": v.get("transform"),
                         **{k: scores[k] for k in GENERATION_METRICS},
                         **{f"{k}_change": scores[k] - report["task"]["adapted"][k] for k in GENERATION_METRICS}})
        report["generalisation"] = {"variants": rows, "examples": len(prompts)}
    else:
        report["generalisation"] = {"skipped": "the data has no prompts (plain text): nothing to generate"}
    if opts.forgetting:
        if base is None:
            report["forgetting"] = {"skipped": "needs the base model (--no-base given)"}
        else:
            texts = fg.read_texts(opts.general_text) if opts.general_text else fg.general_corpus(opts.general_passages)
            report["forgetting"] = {**fg.lm_drift(task, lifted, base, adapted, texts[:opts.general_passages],
                                                  max_length=opts.general_max_length, batch_size=opts.batch,
                                                  threshold=opts.ppl_threshold),
                                    "corpus": opts.general_text or fg.CORPUS_SOURCE}
            probes = load_probes(opts.probes)
            answers = {name: _generate(task, lifted, params, [p["prompt"] for p in probes], opts)
                       for name, params in models.items()}
            report["forgetting"]["probes"] = [
                {"id": p["id"], "kind": p.get("kind"), "prompt": p["prompt"], "base": answers["base"][i],
                 "adapted": answers["adapted"][i], "base_correct": _probe_hit(p, answers["base"][i]),
                 "adapted_correct": _probe_hit(p, answers["adapted"][i])} for i, p in enumerate(probes)]
            checked = [r for r in report["forgetting"]["probes"] if r["base_correct"] is not None]
            report["forgetting"]["probes_correct"] = {"base": sum(r["base_correct"] for r in checked),
                                                      "adapted": sum(r["adapted_correct"] for r in checked),
                                                      "checkable": len(checked)}
    if opts.review and out is not None and pairs:
        rows = [{"id": f"{opts.split}-{i}", "input": pairs[i][0], "reference": " / ".join(pairs[i][1]),
                 "base": replies.get("base", ["(base not evaluated)"] * len(pairs))[i],
                 "adapted": replies["adapted"][i]} for i in _sample(len(pairs), opts.review, opts.seed)]
        report["review_sheet"] = rv.write_sheet(out, rows, title=f"review: {len(rows)} {opts.split} examples",
                                                seed=opts.seed)
    return report


# ------------------------------------------------------------------------------------------------

def evaluate(task, lifted, adapted, base=None, options: EvalOptions | None = None, out_dir=None) -> dict:
    """The protocol on a task (:mod:`jlora.cli.tasks`) and its adapted parameters; ``base`` the
    pretrained parameters (None skips the side-by-side and the forgetting check). With ``out_dir``
    the plots and the review sheet are written there. Returns the report (JSON-able)."""
    opts = options or EvalOptions()
    if opts.split not in task.arrays:
        raise ValueError(f"split {opts.split!r} does not exist; the task has {sorted(task.arrays)}")
    out = pathlib.Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    run = _evaluate_generation if task.kind == "instruction" else _evaluate_classification
    report = run(task, lifted, adapted, base, opts, out)
    report["split"] = opts.split
    report["options"] = dataclasses.asdict(opts)
    return report


# ------------------------------------------------------------------------------------------------
# the report as markdown

def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1000 else f"{v:.1f}"
    return str(v)


def _oneline(text, width: int = 160) -> str:
    t = " ".join(str(text).split()).replace("|", "\\|")
    return t if len(t) <= width else t[:width - 1] + "…"


def report_markdown(report: dict, title: str = "evaluation") -> str:
    lines = [f"# {title}", ""]
    task = report["task"]
    have_base = "base" in task
    keys = (["accuracy", "macro_f1", "macro_precision", "macro_recall", "loss"] if report["kind"] == "classification"
            else ["loss", "perplexity", *GENERATION_METRICS])
    lines += [f"## Task metrics ({report['split']} split, {task['adapted']['examples']} examples)", "",
              "| metric | base | adapted | change |" if have_base else "| metric | adapted |",
              "|---|---|---|---|" if have_base else "|---|---|"]
    for k in keys:
        if k not in task["adapted"]:
            continue
        a = task["adapted"][k]
        if have_base:
            b = task["base"][k]
            lines.append(f"| {k} | {_fmt(b)} | {_fmt(a)} | {_fmt(a - b)} |")
        else:
            lines.append(f"| {k} | {_fmt(a)} |")
    if report["kind"] == "classification":
        lines += ["", "Per class (adapted):", "", "| class | precision | recall | F1 | support |", "|---|---|---|---|---|"]
        for name, c in task["adapted"]["per_class"].items():
            lines.append(f"| {name} | {c['precision']:.4f} | {c['recall']:.4f} | {c['f1']:.4f} | {c['support']} |")
        plots = [task[m].get("confusion_plot") for m in ("base", "adapted") if m in task]
        lines += [""] + [f"![confusion matrix]({pathlib.Path(p).name})" for p in plots if p]
    elif "prompts_decoded" in task["adapted"]:
        d = report["decoding"]
        lines += ["", f"Generation metrics over {task['adapted']['prompts_decoded']} prompts, "
                      f"{'greedy' if not d['temperature'] else 'sampled at temperature %g, seed %d' % (d['temperature'], d['seed'])}"
                      f" decoding, at most {d['max_new_tokens']} new tokens. BLEU / chrF: sacrebleu (0-100), "
                      f"`{task['adapted']['signatures']['bleu']}`; ROUGE-L: rouge-score (0-1)."]
    gen = report.get("generalisation", {})
    lines += ["", "## Generalisation (adapted model, re-phrased inputs)", ""]
    if "skipped" in gen:
        lines.append(f"Skipped: {gen['skipped']}.")
    else:
        metric = "accuracy" if report["kind"] == "classification" else "token_f1"
        second = "macro_f1" if report["kind"] == "classification" else "rougeL"
        lines += [f"| variant | template | {metric} | change | {second} | change |", "|---|---|---|---|---|---|",
                  f"| original | `{{input}}` | {_fmt(task['adapted'][metric])} | - | {_fmt(task['adapted'][second])} | - |"]
        for v in gen["variants"]:
            t = _oneline(v["template"], 60).replace("\n", " ") + (f" ({v['transform']})" if v.get("transform") else "")
            lines.append(f"| {v['id']} | `{t}` | {_fmt(v[metric])} | {_fmt(v[metric + '_change'])} | "
                         f"{_fmt(v[second])} | {_fmt(v[second + '_change'])} |")
    fo = report.get("forgetting")
    if fo is not None:
        lines += ["", "## Forgetting", ""]
        if "skipped" in fo:
            lines.append(f"Skipped: {fo['skipped']}.")
        elif "ratio" in fo:
            lines += [f"General text: {fo['corpus']}; {fo['passages']} passages, {fo['tokens']} tokens "
                      f"(at most {fo['max_length']} per passage).", "",
                      "| base perplexity | adapted perplexity | ratio | threshold | verdict |", "|---|---|---|---|---|",
                      f"| {fo['base_perplexity']:.3f} | {fo['adapted_perplexity']:.3f} | {fo['ratio']:.4f} | "
                      f"{fo['threshold']:.2f} | {'pass' if fo['passed'] else 'FAIL'} |"]
            if fo.get("probes"):
                pc = fo["probes_correct"]
                lines += ["", f"Probe prompts (checkable answers correct: base {pc['base']}/{pc['checkable']}, "
                              f"adapted {pc['adapted']}/{pc['checkable']}):", "",
                          "| probe | prompt | base | adapted |", "|---|---|---|---|"]
                for p in fo["probes"]:
                    lines.append(f"| {p['id']} | {_oneline(p['prompt'], 80)} | {_oneline(p['base'])} | "
                                 f"{_oneline(p['adapted'])} |")
        else:
            lines += [f"General text: {fo['corpus']}; {fo['passages']} passages.", "",
                      "| mean cosine (base vs adapted embedding) | min cosine | similarity-rank correlation | drift | "
                      "threshold | verdict |", "|---|---|---|---|---|---|",
                      f"| {fo['mean_cosine']:.4f} | {fo['min_cosine']:.4f} | {fo['similarity_rank_correlation']:.4f} | "
                      f"{fo['drift']:.4f} | {fo['threshold']:.2f} | {'pass' if fo['passed'] else 'FAIL'} |"]
    if report.get("review_sheet"):
        rs = report["review_sheet"]
        lines += ["", "## Human review", "",
                  f"Blind review sheet: [{pathlib.Path(rs['html']).name}]({pathlib.Path(rs['html']).name}) "
                  f"(also [{pathlib.Path(rs['markdown']).name}]({pathlib.Path(rs['markdown']).name})); "
                  "summarise the filled-in scores with `jlora evaluate --run RUN --read-scores review_scores.csv`."]
    return "\n".join(lines) + "\n"
