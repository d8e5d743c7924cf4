"""tCURLoRA ablation on all-MiniLM-L6-v2: selection (norm / gradient / fisher / random), fixed vs auto
ranks, CUR vs SVD, against full fine-tuning and LoRA r=8, on Rotten Tomatoes and BBC News.

Every run: the same seed, data order, step count, batch, max length, AdamW with a warm-up + cosine
schedule (the `jlora` CLI's recipe) and a new classification head trained with it (PEFT's
modules_to_save). tCURLoRA adapts jlora's default BERT groups (all attention projections [o, q, k, v]
of the 6 layers: n3 = 24 slices of 384x384; MLP up and down: n3 = 6 each). "auto" gives the same
total core budget as the fixed rank, split by importance. gradient / fisher selection calibrate on
``--calib-batches`` training batches (before training; not counted in the step time).

    python examples/tcurlora_ablation.py                                # both data sets, seed 0
    python examples/tcurlora_ablation.py --data rotten_tomatoes --seeds 0,1,2 --steps 150
    python examples/tcurlora_ablation.py --steps 2 --eval-limit 32 --runs lora,tcur_norm   # smoke

Writes ``--json`` and ``--md`` (default docs/tcurlora.json / docs/tcurlora.md).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent

#: run name -> (description, learning rate)
RUNS = {
    "full": ("full fine-tuning", 5e-5),
    "head": ("head only (no adapter)", 2e-3),
    "lora": ("LoRA r=8 (query/value), alpha 16", 2e-3),
    "tcur_norm": ("tCURLoRA norm (official), r fixed", None),
    "tcur_gradient": ("tCURLoRA gradient, r fixed", None),
    "tcur_fisher": ("tCURLoRA fisher, r fixed", None),
    "tcur_random": ("tCURLoRA random, r fixed", None),
    "tcur_norm_auto": ("tCURLoRA norm, auto ranks (same budget)", None),
    "tcur_fisher_auto": ("tCURLoRA fisher, auto ranks (same budget)", None),
    "tcur_svd": ("tSVD (same core size), r fixed", None),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default="rotten_tomatoes,bbc_news")
    p.add_argument("--runs", default=",".join(RUNS))
    p.add_argument("--seeds", default="0")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--max-length", type=int, default=48)
    p.add_argument("--rank", type=int, default=4, help="tCURLoRA r per tensor (fixed runs)")
    p.add_argument("--tcur-lr", type=float, default=2e-3, help="learning rate of tCURLoRA runs (core and head)")
    p.add_argument("--tcur-scale", type=float, default=1.0,
                   help="TCURLoRA(scale=): multiplies the update; under Adam it scales the core's step only")
    p.add_argument("--head", default="pooler", choices=("classifier", "pooler"),
                   help="what trains beside the adapter: the new classifier, or the pooler too (all-MiniLM-L6-v2's "
                        "pooler was never trained by sentence-transformers: its outputs are ~0.05 in size)")
    p.add_argument("--eval-split", default="test", choices=("test", "validation"),
                   help="split scored (tune on validation, report test)")
    p.add_argument("--calib-batches", type=int, default=4)
    p.add_argument("--eval-limit", type=int, default=None, help="test examples scored (default: all)")
    p.add_argument("--from-json", help="comma-separated result files of earlier runs: merge them and write "
                   "--json / --md, training nothing")
    p.add_argument("--json", default=str(ROOT / "docs" / "tcurlora.json"))
    p.add_argument("--md", default=str(ROOT / "docs" / "tcurlora.md"))
    args = p.parse_args(argv)
    args.data = [d for d in args.data.split(",") if d]
    args.runs = [r for r in args.runs.split(",") if r]
    args.seeds = [int(s) for s in args.seeds.split(",") if s]
    args.from_json = [f for f in (args.from_json or "").split(",") if f]
    bad = [r for r in args.runs if r not in RUNS]
    if bad:
        p.error(f"unknown runs {bad}; known: {list(RUNS)}")
    return args


def _head(task, args):
    return task.head if args.head == "classifier" else rf"{task.head}|.*/pooler/dense/(kernel|bias)"


def _spec(run, args, task, calibration):
    import jlora
    from jlora.models import bert

    head = _head(task, args)
    if run == "lora":
        return jlora.LoRA(rank=8, alpha=16, targets=bert.DEFAULT_TARGETS["default"], train_also=head)
    selection = run.split("_")[1]
    budget = 0
    if run.endswith("_auto"):   # same total core size as the fixed-rank runs: sum_g n3_g r^2
        budget = (24 + 6 + 6) * args.rank ** 2
    cal = calibration if selection in ("gradient", "fisher") else None
    return jlora.TCURLoRA(rank="auto" if budget else args.rank, budget=budget or None, selection=selection,
                          calibration=cal, scale=args.tcur_scale, train_also=head)


def run_one(task, run, seed, args):
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    import jlora
    from jlora import data as jdata
    from jlora.core.nodes import is_adapter_leaf
    from jlora.core.paths import flatten_with_paths, matches

    lr = RUNS[run][1] or args.tcur_lr
    key = jax.random.key(seed)
    forward = jlora.lift(task.model.apply)
    train = task.arrays["train"]

    def calib_loss(params, batch):
        logits = task.model.apply(params, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch["labels"]).mean()

    calib = [{k: v[i * args.batch:(i + 1) * args.batch] for k, v in train.items()} for i in range(args.calib_batches)]
    t0 = time.perf_counter()
    if run == "full":
        adapted = jlora.mark_trainable(task.params, r".*")
    elif run == "head":
        adapted = jlora.mark_trainable(task.params, _head(task, args))
    else:
        adapted = jlora.apply(task.params, _spec(run, args, task, (calib_loss, calib)), key)
    setup_s = time.perf_counter() - t0
    trainable, frozen = jlora.partition(adapted)
    c = jlora.count(adapted)
    head = _head(task, args) if run != "full" else None
    head_n = sum(int(np.prod(np.shape(x))) for p, x in flatten_with_paths(trainable, is_leaf=is_adapter_leaf)[0]
                 if head and matches(p, (head,)))
    n_model = sum(int(np.prod(np.shape(x))) for x in jax.tree_util.tree_leaves(task.params))
    ranks = {g: int(gp["u_re"].shape[-1]) for g, gp in adapted.get("jlora_tcur", {}).items()}
    optimizer = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, lr, max(1, args.steps // 10), args.steps),
                            weight_decay=0.0)
    step = jlora.train.make_step(task.loss_fn(forward), optimizer)
    opt_state = optimizer.init(trainable)
    batches = jdata.batches(train, args.batch, seed=seed, epochs=None)
    times = []
    for i in range(args.steps):
        batch = next(batches)
        t = time.perf_counter()
        trainable, opt_state, metrics = step(trainable, frozen, opt_state, batch, jax.random.fold_in(key, i))
        loss = float(metrics["loss"])
        times.append(time.perf_counter() - t)
    adapted = jlora.combine(trainable, frozen)
    ev = task.evaluate(forward, adapted, args.eval_split, limit=args.eval_limit)
    timed = times[1:] or times
    return {"run": run, "seed": seed, "lr": lr, "head": args.head if run != "full" else "all", "scale": args.tcur_scale if run.startswith("tcur") else None,
            "eval_split": args.eval_split, "trainable_params": c["trainable"],
            "adapter_params": c["trainable"] - head_n,
            "trainable_percent": 100.0 * c["trainable"] / n_model, "accuracy": ev["accuracy"], "loss": ev["loss"], "final_train_loss": loss, "step_ms": 1000 * statistics.mean(timed),
            "setup_s": setup_s, "ranks": ranks}


def to_markdown(res) -> str:
    commands = res.get("commands") or [res["command"]]
    lines = ["# tCURLoRA ablation (all-MiniLM-L6-v2)", "",
             "Generated by " + "; ".join(f"`{c}`" for c in commands) + f". {res['steps']} steps of batch "
             f"{res['batch']}, max length {res['max_length']}; AdamW, warm-up + cosine; every run trains the new "
             "classifier" + (" and the pooler" if res.get("head") == "pooler" else "") + ". Adapter params: the "
             "trainable parameters besides that head (% of the model's). Accuracy on the "
             f"{res['eval_split']} split, mean ± sample std over n seeds; '% of full FT': mean accuracy / full "
             "fine-tuning's; 'gap closed': (accuracy - head only) / (full fine-tuning - head only), what the "
             "adapter adds over training the head alone. Step time: mean over steps 2..N.", ""]
    for data, runs in res["results"].items():
        lines += [f"## {data}", "", "| run | lr | scale | adapter params | trainable (with head) | ranks "
                  "| accuracy (mean ± std, n) | % of full FT | gap closed | step time (ms) |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for run in res["runs"]:
            rs = [r for r in runs if r["run"] == run]
            if not rs:
                continue
            acc = [r["accuracy"] for r in rs]
            std = statistics.stdev(acc) if len(acc) > 1 else 0.0
            ranks = ", ".join(f"{g} {k}" for g, k in rs[0]["ranks"].items()) or "-"
            scale = "-" if rs[0]["scale"] is None else f"{rs[0]['scale']:g}"
            n_ad = rs[0].get("adapter_params", 0)
            pct = rs[0]["trainable_percent"] * n_ad / max(rs[0]["trainable_params"], 1)
            # against head-only and full fine-tuning on the seeds all three have (a stopped sweep
            # leaves rows with fewer seeds): like is compared with like
            by = {k: {r["seed"]: r["accuracy"] for r in runs if r["run"] == k} for k in ("head", "full")}
            common = sorted({r["seed"] for r in rs} & set(by["head"]) & set(by["full"]))
            of_full = gap = "-"
            if common:
                a = statistics.mean(r["accuracy"] for r in rs if r["seed"] in common)
                h, f = (statistics.mean(by[k][s] for s in common) for k in ("head", "full"))
                of_full = f"{100 * a / f:.1f} %"
                if f != h:
                    gap = f"{100 * (a - h) / (f - h):.0f} %"
            lines.append(f"| {RUNS[run][0]} | {rs[0]['lr']:g} | {scale} | {n_ad:,} ({pct:.4f} %) | "
                         f"{rs[0]['trainable_params']:,} | {ranks} | {statistics.mean(acc):.4f} ± {std:.4f} "
                         f"(n={len(acc)}) | {of_full} | {gap} | {statistics.mean(r['step_ms'] for r in rs):.1f} |")
        lines.append("")
    return "\n".join(lines)


def merge(paths):
    """One result from several JSON files of this script (e.g. one per data set, run in parallel)."""
    parts = [json.loads(pathlib.Path(p).read_text()) for p in paths]
    res = dict(parts[0])
    res["commands"] = [p["command"] for p in parts]
    res["results"] = {}
    res["runs"] = list(dict.fromkeys(r for p in parts for r in p["runs"]))
    for p in parts:
        for k in ("steps", "batch", "max_length", "eval_split", "head"):
            if p.get(k) != res.get(k):
                raise SystemExit(f"cannot merge: {k} differs ({p.get(k)!r} vs {res.get(k)!r})")
        res["results"].update(p["results"])
    return res


def main(argv=None):
    args = parse_args(argv)
    if args.from_json:          # render (and merge) finished results only
        res = merge(args.from_json)
        _write(res, args)
        print(to_markdown(res))
        return res
    import jax

    from jlora.cli.tasks import ClassificationTask

    res = {"command": "python examples/tcurlora_ablation.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "steps": args.steps, "batch": args.batch, "max_length": args.max_length, "seeds": args.seeds,
           "runs": args.runs, "eval_split": args.eval_split, "head": args.head, "rank": args.rank,
           "tcur_scale": args.tcur_scale, "results": {}}
    for data in args.data:
        out = res["results"][data] = []
        for seed in args.seeds:
            task = ClassificationTask(data=data, max_length=args.max_length, seed=seed)
            for run in args.runs:
                r = run_one(task, run, seed, args)
                print(json.dumps({"data": data, **r}), flush=True)
                out.append(r)
                jax.clear_caches()
                _write(res, args)   # after every run: a long sweep that is stopped keeps what finished
    _write(res, args)
    print(to_markdown(res))
    return res


def _write(res, args):
    for path, text in ((args.json, json.dumps(res, indent=1)), (args.md, to_markdown(res))):
        if path:
            pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
            pathlib.Path(path).write_text(text + "\n")


if __name__ == "__main__":
    main()
