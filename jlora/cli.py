"""The ``jlora`` command: ``train`` / ``eval`` / ``export`` / ``inspect``.

Examples::

    jlora train --model minilm --data rotten_tomatoes --method lora --rank 8 --alpha 16 \\
                --steps 300 --batch 16 --lr 2e-3 --out runs/rt-lora
    jlora train --config run.yaml            # the same keys as the flags (dashes or underscores)
    jlora eval --run runs/rt-lora --split test
    jlora export --run runs/rt-lora --format merged --out runs/rt-lora/merged
    jlora inspect --model minilm --method lora --rank 8 --targets all-linear

A run directory holds ``config.json`` (the resolved settings), ``adapter/`` (jlora adapter
checkpoint), ``metrics.jsonl`` (one JSON record per logged step), ``plot.png``, ``summary.txt``
and ``results.json`` (final validation and test metrics; ``test`` is reported, never used to
choose anything).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

DEFAULTS = dict(model="minilm", data="rotten_tomatoes", method="lora", rank=8, alpha=16.0, targets="default",
                rslora=False, init="kaiming", dropout=0.0, steps=300, batch=16, lr=2e-3, weight_decay=0.0,
                seed=0, max_length=48, eval_every=0, accum_steps=1, scan_layers=False, out=None, progress=True,
                eval_limit=None, quant="nf4", double_quant=True, quantize_frozen=None, param_dtype="float32",
                virtual_tokens=20, prefix_projection=None, ptuning_encoder="mlp", ptuning_hidden=None,
                prompt_init="random", prompt_init_text=None, prefix_init="random",
                init_r=12, target_r=8, tinit=0, tfinal=0, delta_t=1, orth_reg_weight=0.5,
                selection="norm", tcur_scale=1.0, budget=None, calib_batches=4)
PROMPT_METHODS = ("prompt", "prefix", "ptuning")
METHODS = ("lora", "qlora", "dora", "adalora", "ia3", "tcur", "head") + PROMPT_METHODS
#: IA3's default (targets, feed-forward) per model family, PEFT's tables (jlora.methods.ia3.DEFAULTS)
MODEL_FAMILY = {"minilm": "bert", "smollm2": "llama"}


def _add_train_args(p: argparse.ArgumentParser):
    p.add_argument("--config", help="YAML or JSON file with any of these settings")
    p.add_argument("--model", choices=("minilm", "smollm2"))
    p.add_argument("--data", help="rotten_tomatoes | bbc_news | chatterbot | natural_instructions:<subtask>")
    p.add_argument("--method", choices=METHODS, help="lora, qlora (4-bit frozen base), dora, adalora, ia3, tcur (tCURLoRA), head (train "
                   "only the new head: baseline), prompt (prompt tuning), prefix (prefix tuning / P-tuning v2), "
                   "ptuning (P-tuning v1)")
    p.add_argument("--init-r", type=int, help="adalora: initial rank of every module (default 12)")
    p.add_argument("--target-r", type=int, help="adalora: average rank the budget falls to (default 8)")
    p.add_argument("--tinit", type=int, help="adalora: warm-up steps before any rank is masked")
    p.add_argument("--tfinal", type=int, help="adalora: final steps with the budget fixed at the target")
    p.add_argument("--delta-t", type=int, help="adalora: mask every N steps in between")
    p.add_argument("--orth-reg-weight", type=float, help="adalora: weight of the orthogonality regulariser")
    p.add_argument("--selection", choices=("norm", "gradient", "fisher", "random", "svd"),
                   help="tcur: how fibres are chosen (norm: the paper's; gradient/fisher calibrate on training batches)")
    p.add_argument("--tcur-scale", type=float, help="tcur: multiplies the update (default 1, the paper's)")
    p.add_argument("--budget", type=int, help="tcur: total core parameters; ranks per tensor then follow importance "
                   "(--rank is ignored)")
    p.add_argument("--calib-batches", type=int, help="tcur: training batches for gradient/fisher selection (default 4)")
    p.add_argument("--virtual-tokens", type=int, help="prompt/prefix/ptuning: number of virtual tokens")
    p.add_argument("--prefix-projection", type=int,
                   help="prefix: hidden size of Li & Liang's MLP reparameterisation (default: none, deep prompts)")
    p.add_argument("--ptuning-encoder", choices=("mlp", "lstm"), help="ptuning: the prompt encoder")
    p.add_argument("--ptuning-hidden", type=int, help="ptuning: encoder hidden size (default: the model's)")
    p.add_argument("--prompt-init", choices=("random", "vocab", "text"), help="prompt: initialisation")
    p.add_argument("--prompt-init-text", help="prompt: the text for --prompt-init text (also --prefix-init text)")
    p.add_argument("--prefix-init", choices=("random", "vocab", "text"),
                   help="prefix (deep prompts, Llama): random = PEFT's N(0,1); vocab / text = the keys/values the "
                        "frozen model computes for random tokens / --prompt-init-text")
    p.add_argument("--quant", choices=("nf4", "int4", "int4_asym", "int8"), help="qlora: frozen-base scheme")
    p.add_argument("--no-double-quant", dest="double_quant", action="store_false", default=None)
    p.add_argument("--quantize-frozen", help="qlora: also quantise frozen kernels: 'all-linear' or a regex")
    p.add_argument("--param-dtype", choices=("float32", "bfloat16", "float16"),
                   help="store the frozen pretrained weights in this dtype (e.g. bf16 LoRA); new heads stay float32")
    p.add_argument("--rank", type=int)
    p.add_argument("--alpha", type=float)
    p.add_argument("--targets", help="'default', 'all-linear' or a regex over parameter paths")
    p.add_argument("--rslora", action="store_true", default=None)
    p.add_argument("--init", choices=("kaiming", "gaussian", "pissa", "olora"))
    p.add_argument("--dropout", type=float)
    p.add_argument("--steps", type=int)
    p.add_argument("--batch", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--max-length", type=int)
    p.add_argument("--eval-every", type=int, help="evaluate on validation every N steps (0: at the end only)")
    p.add_argument("--eval-limit", type=int, help="evaluate on at most N examples per split")
    p.add_argument("--accum-steps", type=int)
    p.add_argument("--scan-layers", action="store_true", default=None)
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None)
    p.add_argument("--out", help="run directory (created; must not hold another run)")


def load_config(args: argparse.Namespace | dict) -> dict:
    """Defaults <- config file <- explicit flags; validated."""
    given = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    cfg = dict(DEFAULTS)
    if given.get("config"):
        path = pathlib.Path(given["config"])
        if not path.is_file():
            raise SystemExit(f"jlora: config file {path} does not exist")
        text = path.read_text()
        if path.suffix in (".yaml", ".yml"):
            import yaml

            loaded = yaml.safe_load(text) or {}
        else:
            loaded = json.loads(text)
        if not isinstance(loaded, dict):
            raise SystemExit(f"jlora: config file {path} must hold a mapping, got {type(loaded).__name__}")
        loaded = {k.replace("-", "_"): v for k, v in loaded.items()}
        unknown = sorted(set(loaded) - set(DEFAULTS))
        if unknown:
            raise SystemExit(f"jlora: unknown keys in {path}: {unknown}; known: {sorted(DEFAULTS)}")
        cfg.update(loaded)
    cfg.update({k: v for k, v in given.items() if k in DEFAULTS and v is not None})
    if cfg["method"] not in METHODS:
        raise SystemExit(f"jlora: method must be one of {METHODS}, got {cfg['method']!r}")
    for key in ("steps", "batch", "rank", "max_length", "accum_steps", "virtual_tokens", "init_r", "target_r",
                "delta_t", "calib_batches"):
        if not isinstance(cfg[key], int) or cfg[key] < 1:
            raise SystemExit(f"jlora: {key} must be a positive integer, got {cfg[key]!r}")
    for key in ("lr", "tcur_scale"):
        if isinstance(cfg[key], bool) or not (isinstance(cfg[key], (int, float)) and cfg[key] > 0):
            raise SystemExit(f"jlora: {key} must be a positive number, got {cfg[key]!r}")
    if cfg["budget"] is not None and (not isinstance(cfg["budget"], int) or cfg["budget"] < 1):
        raise SystemExit(f"jlora: budget must be a positive integer, got {cfg['budget']!r}")
    if cfg["batch"] % cfg["accum_steps"]:
        raise SystemExit(f"jlora: batch {cfg['batch']} is not divisible by accum_steps {cfg['accum_steps']}")
    return cfg


def build(cfg: dict, task=None):
    """(task, adapted params, spec or None) for a config."""
    import jax

    import jlora
    from jlora.tasks import make_task

    if task is None:
        task = make_task(cfg["model"], cfg["data"], max_length=cfg["max_length"], seed=cfg["seed"],
                         scan_layers=cfg["scan_layers"])
    params = _cast_frozen(task.params, cfg["param_dtype"], task.head)
    if cfg["method"] in PROMPT_METHODS:
        return task, *_build_prompt(cfg, task, params)
    if cfg["method"] == "head":
        if task.head is None:
            raise SystemExit(f"jlora: model {cfg['model']} has no new head to train; use --method lora")
        return task, jlora.mark_trainable(params, task.head), None
    targets = task.targets.get(cfg["targets"], cfg["targets"])
    exclude = task.exclude.get(cfg["targets"]) if hasattr(task, "exclude") else None
    common = dict(rank=cfg["rank"], alpha=cfg["alpha"], targets=targets, exclude=exclude, rslora=cfg["rslora"],
                  init=cfg["init"], dropout=cfg["dropout"], train_also=task.head)
    try:
        spec = _method_spec(cfg, common, task)
    except ValueError as e:
        raise SystemExit(f"jlora: {e}") from None
    model_fn = task.model.apply if cfg["scan_layers"] else None
    adapted = jlora.apply(params, spec, jax.random.key(cfg["seed"]), model=model_fn,
                          example=task.example() if model_fn else None)
    return task, adapted, spec


def _method_spec(cfg: dict, common: dict, task):
    """The jlora spec for a weight-adapting --method (lora, qlora, dora, adalora, ia3, tcur)."""
    import jlora
    from jlora.methods.ia3 import DEFAULTS as IA3_DEFAULTS

    method = cfg["method"]
    if method == "qlora":
        return jlora.QLoRA(**common, quant=cfg["quant"], double_quant=cfg["double_quant"] and cfg["quant"] != "int8",
                           quantize_frozen=cfg["quantize_frozen"])
    if method == "dora":
        return jlora.DoRA(**common)
    if method == "adalora":
        return jlora.AdaLoRA(init_r=cfg["init_r"], target_r=cfg["target_r"], tinit=cfg["tinit"], tfinal=cfg["tfinal"],
                             delta_t=cfg["delta_t"], orth_reg_weight=cfg["orth_reg_weight"], total_steps=cfg["steps"],
                             alpha=cfg["alpha"], dropout=cfg["dropout"], targets=common["targets"],
                             exclude=common["exclude"], train_also=common["train_also"])
    if method == "tcur":
        return jlora.TCURLoRA(rank="auto" if cfg["budget"] else cfg["rank"], budget=cfg["budget"],
                              selection=cfg["selection"], scale=cfg["tcur_scale"], exclude=common["exclude"],
                              calibration=_calibration(cfg, task) if cfg["selection"] in ("gradient", "fisher") else None,
                              train_also=common["train_also"])
    if method == "ia3":
        targets, feedforward = IA3_DEFAULTS[MODEL_FAMILY[cfg["model"]]]
        if cfg["targets"] != "default":
            targets = common["targets"]
        return jlora.IA3(targets=targets, feedforward=feedforward, exclude=common["exclude"],
                         train_also=common["train_also"])
    return jlora.LoRA(**common)


def _calibration(cfg: dict, task):
    """(loss_fn, batches) for tCURLoRA's gradient / fisher selection: the task's loss on the plain
    model (no dropout) over the first --calib-batches training batches of --batch examples."""
    loss = task.loss_fn(task.model.apply)
    train, b = task.arrays["train"], cfg["batch"]
    n = len(next(iter(train.values())))
    if cfg["calib_batches"] * b > n:
        raise SystemExit(f"jlora: --calib-batches {cfg['calib_batches']} x --batch {b} exceeds the {n} training examples")
    batches = [{k: v[i * b:(i + 1) * b] for k, v in train.items()} for i in range(cfg["calib_batches"])]
    return (lambda params, batch: loss(params, batch, None)[0]), batches


def _build_prompt(cfg: dict, task, params):
    """(adapted, spec) for --method prompt | prefix | ptuning. The base model stays frozen; a new
    classification head trains in full alongside the prompt (PEFT's modules_to_save)."""
    import jax

    import jlora

    n = cfg["virtual_tokens"]
    try:
        if cfg["method"] == "prompt":
            spec = jlora.PromptTuning(n, init=cfg["prompt_init"], init_text=cfg["prompt_init_text"])
        elif cfg["method"] == "prefix":
            spec = jlora.PrefixTuning(n, projection_hidden=cfg["prefix_projection"], init=cfg["prefix_init"],
                                      init_text=cfg["prompt_init_text"] if cfg["prefix_init"] == "text" else None)
        else:
            spec = jlora.PTuning(n, encoder=cfg["ptuning_encoder"], hidden=cfg["ptuning_hidden"])
    except ValueError as e:
        raise SystemExit(f"jlora: {e}") from None
    if task.head is not None:
        params = jlora.mark_trainable(params, task.head)
    try:
        adapted = jlora.apply_prompt(params, spec, jax.random.key(cfg["seed"]), config=task.model.config,
                                     tokenizer=task.tokenizer, model=task.model)
    except ValueError as e:
        raise SystemExit(f"jlora: {e}") from None
    return adapted, spec


def _cast_frozen(params, dtype: str, head_pattern):
    """The pretrained weights stored in ``dtype`` (floating leaves only; a new head keeps its own)."""
    import jax
    import jax.numpy as jnp

    from jlora.core.paths import flatten_with_paths, matches

    if dtype in (None, "float32"):
        return params
    target = jnp.dtype(dtype)
    flat, treedef = flatten_with_paths(params)
    leaves = [leaf if (not jnp.issubdtype(leaf.dtype, jnp.floating) or (head_pattern and matches(path, (head_pattern,))))
              else leaf.astype(target) for path, leaf in flat]
    return jax.tree_util.tree_unflatten(treedef, leaves)


def train(cfg: dict, task=None, log=print) -> dict:
    """Runs one training configuration end to end; returns the results dict."""
    import jax
    import optax

    import jlora
    from jlora import io as jio
    from jlora.data import batches
    from jlora.train import fit, init_opt_state, make_step, plot_history

    out = pathlib.Path(cfg["out"] or f"runs/{cfg['model']}-{cfg['data'].replace(':', '_')}-{cfg['method']}")
    if (out / "config.json").exists():
        raise SystemExit(f"jlora: {out} already holds a run; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    task, adapted, spec = build(cfg, task)
    summary = jlora.summary(adapted)
    (out / "summary.txt").write_text(summary + "\n")
    counts = jlora.count(adapted)
    log(summary.splitlines()[-1])
    lifted = jlora.lift(task.model.apply)
    optimizer = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, cfg["lr"], max(1, cfg["steps"] // 10), cfg["steps"]),
                            weight_decay=cfg["weight_decay"])
    trainable, frozen = jlora.partition(adapted)
    alloc = jlora.adalora_allocator(spec) if cfg["method"] == "adalora" else None  # runs inside the step
    opt_state = init_opt_state(optimizer, trainable, adapter_update=alloc)
    step = make_step(task.loss_fn(lifted), optimizer, accum_steps=cfg["accum_steps"], adapter_update=alloc)
    stream = batches(task.arrays["train"], cfg["batch"], seed=cfg["seed"], epochs=None)

    def eval_fn(t):
        return task.evaluate(lifted, jlora.combine(t, frozen), "validation", limit=cfg["eval_limit"])

    setup_s = time.perf_counter() - t0
    try:
        trainable, opt_state, history = fit(
            step, trainable, frozen, opt_state, stream, cfg["steps"], jax.random.key(cfg["seed"] + 1),
            tokens_per_batch=cfg["batch"] * task.tokens_per_example(), log_path=str(out / "metrics.jsonl"),
            eval_fn=eval_fn, eval_every=cfg["eval_every"] or None, progress=cfg["progress"],
            desc=f"{cfg['method']} {cfg['model']}/{cfg['data']}", diverge_factor=10.0)
    except FloatingPointError as e:  # a diverged run saves no adapter and exits non-zero
        raise SystemExit(f"jlora: training stopped, no adapter saved: {e}") from None
    adapted = jlora.combine(trainable, frozen)
    # prompt methods: the saved adapter holds the final prompt / prefix (reparameterisations dropped)
    adapted = jlora.export_prompt(adapted)
    jio.save_adapter(str(out / "adapter"), adapted, spec=spec)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    test = task.evaluate(lifted, adapted, "test", limit=cfg["eval_limit"])
    timed = [r for r in history if r["step"] > 1]
    results = {
        "config": cfg, "trainable_params": counts["trainable"], "total_params": counts["total"],
        "trainable_percent": 100.0 * counts["trainable"] / counts["total"],
        "adapter_bytes_on_disk": _dir_bytes(out / "adapter"),
        "validation": {k: v for k, v in history[-1].items() if k.startswith("eval_")},
        "test": test, "final_train_loss": history[-1]["loss"],
        "skipped_steps": history[-1].get("skipped", 0),
        "steps_per_s": (timed[-1]["step"] - 1) / (timed[-1]["elapsed_s"] - history[0]["elapsed_s"]) if timed else None,
        "setup_s": setup_s, "wall_s": time.perf_counter() - t0,
    }
    if cfg["method"] == "adalora":
        from jlora.methods.adalora import kept_ranks

        results["adalora_ranks"] = kept_ranks(adapted)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    plot_history(history, str(out / "plot.png"), title=f"{cfg['method']} on {cfg['model']}/{cfg['data']}")
    log(f"test accuracy {test['accuracy']:.4f}  test loss {test['loss']:.4f}  -> {out}" if "accuracy" in test
        else f"test loss {test['loss']:.4f}  -> {out}")
    results["_adapted"] = adapted
    results["_task"] = task
    return results


def _dir_bytes(path) -> int:
    return sum(f.stat().st_size for f in pathlib.Path(path).rglob("*") if f.is_file())


def _load_run(run: str):
    from jlora.methods.prompt import load_adapter

    run = pathlib.Path(run)
    if not (run / "config.json").is_file():
        raise SystemExit(f"jlora: {run} is not a run directory (no config.json)")
    cfg = json.loads((run / "config.json").read_text())
    from jlora.tasks import make_task

    task = make_task(cfg["model"], cfg["data"], max_length=cfg["max_length"], seed=cfg["seed"],
                     scan_layers=cfg["scan_layers"])
    adapted = load_adapter(str(run / "adapter"), task.params)   # jlora.io.load_adapter + a saved prompt
    return cfg, task, adapted


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="jlora", description="Parameter-efficient fine-tuning for JAX/Flax")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train_args(sub.add_parser("train", help="fine-tune a model; writes a run directory"))
    p_eval = sub.add_parser("eval", help="evaluate a run's adapter on a split")
    p_eval.add_argument("--run", required=True)
    p_eval.add_argument("--split", default="test", choices=("train", "validation", "test"))
    p_eval.add_argument("--limit", type=int)
    p_exp = sub.add_parser("export", help="write merged weights, the adapter, or HF PEFT files")
    p_exp.add_argument("--run", required=True)
    p_exp.add_argument("--format", required=True, choices=("merged", "adapter", "peft"))
    p_exp.add_argument("--out", required=True)
    p_ins = sub.add_parser("inspect", help="print the adapter summary table for a run or a spec")
    p_ins.add_argument("--run")
    _add_train_args(p_ins)
    args = parser.parse_args(argv)

    import jlora
    from jlora import io as jio

    if args.command == "train":
        results = train(load_config(args))
        print(json.dumps({k: v for k, v in results.items() if not k.startswith("_") and k != "config"}, indent=2))
    elif args.command == "eval":
        cfg, task, adapted = _load_run(args.run)
        metrics = task.evaluate(jlora.lift(task.model.apply), adapted, args.split, limit=args.limit)
        print(json.dumps({"run": args.run, "split": args.split, **metrics}, indent=2))
    elif args.command == "export":
        cfg, task, adapted = _load_run(args.run)
        if args.format == "merged":
            jio.save_merged(args.out, adapted)
        elif args.format == "adapter":
            jio.save_adapter(args.out, adapted)
        else:
            spec = None
            if cfg["method"] == "adalora":    # the schedule and init_r go into the AdaLoraConfig
                targets = task.targets.get(cfg["targets"], cfg["targets"])
                spec = _method_spec(cfg, {"targets": targets, "exclude": None, "train_also": task.head}, task)
            jio.save_peft(args.out, adapted, task.naming, task_type=getattr(task, "peft_task_type", None), spec=spec)
        print(f"wrote {args.format} to {args.out}")
    elif args.command == "inspect":
        if args.run:
            _, _, adapted = _load_run(args.run)
        else:
            _, adapted, _ = build(load_config(args))
        print(jlora.summary(adapted))
    return 0


if __name__ == "__main__":
    sys.exit(main())
