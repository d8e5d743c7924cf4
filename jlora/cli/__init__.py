"""The ``jlora`` command: ``train`` / ``eval`` / ``export`` / ``generate`` / ``predict`` / ``inspect`` /
``estimate``.

Examples::

    jlora train --model minilm --data rotten_tomatoes --method lora --rank 8 --alpha 16 \\
                --steps 300 --batch 16 --lr 2e-3 --out runs/rt-lora
    jlora train --model ./my_llama --data chats.jsonl --method lora --steps 500 --out runs/mine
    jlora train --config run.yaml            # the same keys as the flags (dashes or underscores)
    jlora eval --run runs/rt-lora --split test
    jlora export --run runs/rt-lora --format merged --out runs/rt-lora/merged
    jlora inspect --model minilm --method lora --rank 8 --targets all-linear
    jlora estimate --model llama-3.1-8b --method qlora --batch 4 --max-length 2048 --remat --hardware rtx4090

A run directory holds ``config.json`` (the resolved settings, written first), ``checkpoints/``
(Orbax training states every ``--checkpoint-every`` steps and at exit), ``adapter/`` (jlora adapter
checkpoint), ``metrics.jsonl`` (one JSON record per logged step), ``plot.png``, ``summary.txt``
and ``results.json`` (written last: final validation and test metrics; ``test`` is reported, never
used to choose anything). A run killed before ``results.json`` resumes from its newest good
checkpoint when the same command is run again; a finished one is replaced only with ``--overwrite``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import pathlib
import shutil
import signal
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jlora
import jlora.train
from jlora import assets
from jlora import eval as jeval
from jlora import io as jio
from jlora.cli import analyze as analyze_cli
from jlora.cli import data_check as data_check_cli
from jlora.cli import evaluate as evaluate_cli
from jlora.cli.options import add_decoding_args
from jlora.cli.tasks import make_task as _make
from jlora.core.paths import flatten_with_paths, matches
from jlora.core.spec import AdapterSpec
from jlora.data import batches, files
from jlora.data.files import DataFileError, looks_like_file
from jlora.eval.metrics import GENERATION_METRICS   # what --eval-generate lets --best-metric select on
from jlora.methods.adalora import kept_ranks
from jlora.models.hf_export import hf_tensors, llama_config_json, save_hf_directory
from jlora.models.llama import ATTENTION, DEFAULT_TARGETS as LLAMA_TARGETS
from jlora.models._hf import REMAT_POLICIES
from jlora.train import init_opt_state, make_step, plot_history
from jlora.distributed import barrier, initialize, is_main_process, load_rules, make_mesh, resolve_rules, shard
from jlora.distributed import sharding as shd
from jlora import planner

#: the methods the command offers: each spec class declares its --method name, its own settings
#: (cli_fields) and how it is built from them (from_cli); "head" trains only a new head
METHOD_SPECS = {cls.cli_method: cls for cls in (jlora.LoRA, jlora.QLoRA, jlora.DoRA, jlora.AdaLoRA, jlora.IA3,
                                                jlora.TCURLoRA, jlora.PromptTuning, jlora.PrefixTuning, jlora.PTuning)}
PROMPT_METHODS = tuple(m for m, cls in METHOD_SPECS.items() if not issubclass(cls, AdapterSpec))
METHODS = tuple(m for m in METHOD_SPECS if m not in PROMPT_METHODS) + ("head",) + PROMPT_METHODS


def _method_fields() -> dict:
    """``{name: CliField}`` over every method (a field shared by several methods is declared once)."""
    fields = {}
    for cls in METHOD_SPECS.values():
        for field in cls.cli_fields:
            if fields.setdefault(field.name, field) != field:
                raise RuntimeError(f"{cls.__name__} declares the CLI field {field.name!r} differently from another method")
    return fields


METHOD_FIELDS = _method_fields()

DEFAULTS = dict(model="minilm", data="rotten_tomatoes", method="lora", rank=8, alpha=16.0, targets="default",
                rslora=False, init="kaiming", dropout=0.0, steps=300, batch=16, lr=2e-3, weight_decay=0.0,
                seed=0, max_length=48, eval_every=0, accum_steps=1, scan_layers=False, remat=False, loss_chunk=0, attention=None,
                fuse_projections=False, out=None, progress=True,
                eval_limit=None, param_dtype="float32",
                # the methods' own settings (their cli_fields)
                **{name: field.default for name, field in METHOD_FIELDS.items()},
                # your data (jlora.cli.options.DATA_OPTIONS)
                text_column=None, label_column="label", prompt_column=None, response_column=None,
                messages_column=None, validation_file=None, test_file=None, packing=False, image_column=None,
                # the trainer
                optimizer="adamw", schedule="cosine", warmup_ratio=0.1, warmup_steps=None, clip_norm=0.0,
                log_every=10, logdir=None, checkpoint_every=100, keep_checkpoints=2, best_metric=None,
                early_stopping=0, max_nonfinite=5, eval_generate=0, eval_max_new_tokens=64,
                # sharding over this machine's devices
                mesh=None, rules=None)
#: settings that may differ when a run is resumed (they do not change what is computed)
RESUMABLE_CHANGES = ("progress", "out", "logdir", "eval_limit", "remat", "loss_chunk", "attention", "fuse_projections")
OPTIMIZERS = ("adamw", "adafactor", "sgd", "lion")
SCHEDULES = ("constant", "linear", "cosine")
DATA_KEYS = ("text_column", "label_column", "prompt_column", "response_column", "messages_column",
             "validation_file", "test_file", "packing", "image_column")


def _add_train_args(p: argparse.ArgumentParser):
    p.add_argument("--config", help="YAML or JSON file with any of these settings")
    p.add_argument("--model", help="minilm | smollm2 | a Hugging Face directory (BERT, Llama, Mistral, Qwen2, ViT) | "
                                   "a .gguf file")
    p.add_argument("--data", help="rotten_tomatoes | bbc_news | chatterbot | natural_instructions:<subtask> | a CSV / "
                                  "TSV / JSON / JSONL / Parquet file")
    g = p.add_argument_group("your data (a --data file)")
    g.add_argument("--text-column", help="classification text, or plain LM text (default: text)")
    g.add_argument("--label-column", help="classification label (default: label); the label set is read from the data")
    g.add_argument("--prompt-column", help="LM prompt (default: found among prompt / instruction / question / input)")
    g.add_argument("--response-column", help="LM response (default: response / completion / output / answer)")
    g.add_argument("--messages-column", help="LM chat conversations, rendered with the model's chat template "
                                             "(default: messages)")
    g.add_argument("--image-column", help="ViT: image file paths, relative to the data file (default: image)")
    g.add_argument("--validation-file", help="validation split (default: cut from --data, seeded)")
    g.add_argument("--test-file", help="test split (default: cut from --data, seeded)")
    g.add_argument("--packing", action="store_true", default=None,
                   help="LM: pack examples into full rows of --max-length tokens (no padding); each example "
                        "attends only to itself and restarts its positions (segment ids)")
    t = p.add_argument_group("the trainer")
    t.add_argument("--optimizer", choices=OPTIMIZERS)
    t.add_argument("--schedule", choices=SCHEDULES, help="learning-rate decay after warm-up (default cosine)")
    t.add_argument("--warmup-ratio", type=float, help="warm-up as a fraction of --steps (default 0.1)")
    t.add_argument("--warmup-steps", type=int, help="warm-up steps (overrides --warmup-ratio)")
    t.add_argument("--clip-norm", type=float, help="clip gradients to this global norm (0: off, the default)")
    t.add_argument("--log-every", type=int, help="write a metrics record every N steps (default 10)")
    t.add_argument("--logdir", help="also write TensorBoard event files here")
    t.add_argument("--checkpoint-every", type=int, help="save the training state every N steps (default 100; 0: only "
                                                        "at the end and on SIGTERM / Ctrl-C)")
    t.add_argument("--keep-checkpoints", type=int, help="training states kept (default 2)")
    t.add_argument("--best-metric", help="with --eval-every: keep the adapter with the best validation metric "
                                         "instead of the last: loss, accuracy, macro_f1 (classifiers), perplexity, "
                                         "or with --eval-generate a generation metric: " + ", ".join(GENERATION_METRICS))
    t.add_argument("--eval-generate", type=int, metavar="N",
                   help="language models: at each evaluation also decode the first N validation prompts greedily and "
                        "score the replies (exact match, token F1, ROUGE-L, BLEU, chrF; default 0: off)")
    t.add_argument("--eval-max-new-tokens", type=int, help="with --eval-generate: the longest reply (default 64)")
    t.add_argument("--early-stopping", type=int, help="with --best-metric: stop after N evaluations without improvement")
    t.add_argument("--mesh", help="shard the run over this machine's devices: named mesh axes, e.g. data=2,fsdp=4 "
                                  "(one size may be -1: the rest); the batch is split over data and fsdp, the "
                                  "weights by the model's partition rules (or --rules)")
    t.add_argument("--rules", help="with --mesh: a JSON file of partition rules [[\"regex\", [\"fsdp\", null]], ...] "
                                   "instead of the model's own")
    t.add_argument("--max-nonfinite", type=int, help="steps in a row whose loss or gradients are NaN / Inf are skipped; "
                                                      "this many stop the run, checked at each log record (default 5; "
                                                      "1 with --log-every 1: stop at the first)")
    p.add_argument("--overwrite", action="store_true", help="replace a finished run in --out")
    p.add_argument("--distributed", action="store_true",
                   help="one of many processes (a TPU slice, or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / "
                        "JAX_PROCESS_ID set, as tpu_scripts/jlora-tpu local N does): join them, shard over every "
                        "device (--mesh, default data=-1); --out must be a directory all processes see")
    p.add_argument("--dry-run", action="store_true", help="build everything, print each array's per-device shape and "
                                                          "the compiled step's memory per device, train nothing")
    p.add_argument("--resume", dest="resume", action="store_const", const=True, default=None,
                   help="continue the interrupted run in --out (the default when there is one; with this flag, "
                        "its absence is an error)")
    p.add_argument("--no-resume", dest="resume", action="store_const", const=False,
                   help="refuse to continue an interrupted run in --out")
    p.add_argument("--method", choices=METHODS, help="lora, qlora (4-bit frozen base), dora, adalora, ia3, tcur (tCURLoRA), head (train "
                   "only the new head: baseline), prompt (prompt tuning), prefix (prefix tuning / P-tuning v2), "
                   "ptuning (P-tuning v1)")
    for field in METHOD_FIELDS.values():   # each method's own settings
        flag = "--" + field.name.replace("_", "-")
        if field.kind == "flag_off":
            p.add_argument("--no-" + field.name.replace("_", "-"), dest=field.name, action="store_false", default=None,
                           help=field.help)
        elif field.kind == "choice":
            p.add_argument(flag, choices=field.choices, help=field.help)
        else:
            p.add_argument(flag, type=_KIND_TYPES[field.kind], help=field.help)
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
    p.add_argument("--remat", nargs="?", const=True, default=None, metavar="POLICY",
                   help="recompute each layer in the backward pass: activations of one layer instead of all, for about a "
                        "third more compute (see jlora estimate); or keep what a policy saves: " + ", ".join(REMAT_POLICIES))
    p.add_argument("--loss-chunk", type=int, metavar="N",
                   help="causal LMs: run the vocabulary head and the loss on N positions at a time, so the float32 "
                        "(batch, length, vocab) logits never exist (0: all at once, the default; see jlora estimate)")
    p.add_argument("--attention", choices=ATTENTION,
                   help="decoders: how a layer attends; 'xla' / 'cudnn' are jax.nn.dot_product_attention's kernels "
                        "(cudnn: NVIDIA GPUs, bfloat16); the same numbers (default: explicit)")
    p.add_argument("--fuse-projections", action="store_true", default=None,
                   help="decoders: q/k/v and gate/up as one matmul each, LoRA's A factors joined; the same numbers")
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
    _validate(cfg)
    return cfg


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _validate(cfg: dict) -> None:
    """Every setting checked; the message names the flag, the value and what was expected."""
    def bad(key, value, expected):
        raise SystemExit(f"jlora: --{key.replace('_', '-')} must be {expected}, got {value!r}")

    for key, choices in (("method", METHODS), ("optimizer", OPTIMIZERS), ("schedule", SCHEDULES)):
        if cfg[key] not in choices:
            bad(key, cfg[key], f"one of {choices}")
    for key in ("model", "data"):
        if not isinstance(cfg[key], str) or not cfg[key]:
            bad(key, cfg[key], "a name or a path")
    for kind, keys in (("positive_int", ("steps", "batch", "rank", "max_length", "accum_steps", "log_every",
                                          "keep_checkpoints", "max_nonfinite", "eval_max_new_tokens")),
                       ("int>=0", ("eval_every", "checkpoint_every", "early_stopping", "seed", "eval_generate")),
                       ("positive_number", ("lr", "alpha")),
                       ("number>=0", ("weight_decay", "clip_norm"))):
        for key in keys:
            _check_value(key, kind, cfg[key], bad)
    if not _is_number(cfg["dropout"]) or not 0 <= cfg["dropout"] < 1:
        bad("dropout", cfg["dropout"], "a number in [0, 1)")
    if not _is_number(cfg["warmup_ratio"]) or not 0 <= cfg["warmup_ratio"] < 1:
        bad("warmup_ratio", cfg["warmup_ratio"], "a number in [0, 1)")
    if cfg["warmup_steps"] is not None and (not _is_int(cfg["warmup_steps"]) or not 0 <= cfg["warmup_steps"] < cfg["steps"]):
        bad("warmup_steps", cfg["warmup_steps"], f"an integer in [0, --steps={cfg['steps']})")
    _check_value("eval_limit", "optional_positive_int", cfg["eval_limit"], bad)
    _check_value("loss_chunk", "int>=0", cfg["loss_chunk"], bad)
    if cfg["attention"] is not None and cfg["attention"] not in ATTENTION:
        bad("attention", cfg["attention"], f"one of {ATTENTION}")
    if not isinstance(cfg["fuse_projections"], bool):
        bad("fuse_projections", cfg["fuse_projections"], "true or false")
    if not isinstance(cfg["scan_layers"], bool):
        bad("scan_layers", cfg["scan_layers"], "true or false")
    if not isinstance(cfg["remat"], bool) and cfg["remat"] not in REMAT_POLICIES:
        bad("remat", cfg["remat"], f"true, false or a policy in {REMAT_POLICIES}")
    for key in ("text_column", "prompt_column", "response_column", "messages_column", "validation_file", "test_file",
                "image_column", "logdir", "label_column", "out"):
        _check_value(key, "optional_str", cfg[key], bad)
    files_given = {k: cfg[k] for k in ("data", "validation_file", "test_file") if isinstance(cfg[k], str)
                   and cfg[k] and os.path.isfile(cfg[k])}
    if "test_file" in files_given and any(os.path.samefile(files_given["test_file"], files_given[k])
                                          for k in ("data", "validation_file") if k in files_given):
        raise SystemExit(f"jlora: --test-file {cfg['test_file']} is also the training or validation data; the test "
                         f"split must be one that nothing trains or selects on")
    for field in METHOD_FIELDS.values():   # each method's own settings, by the kind it declares
        _check_value(field.name, field.kind, cfg[field.name], bad, field.choices)
    if cfg["batch"] % cfg["accum_steps"]:
        raise SystemExit(f"jlora: --batch {cfg['batch']} is not divisible by --accum-steps {cfg['accum_steps']}")
    if cfg["best_metric"] is not None:
        if cfg["best_metric"] not in BEST_METRICS:
            bad("best_metric", cfg["best_metric"], f"one of {tuple(BEST_METRICS)}")
        if not cfg["eval_every"]:
            raise SystemExit("jlora: --best-metric needs --eval-every N (the metric is measured every N steps)")
        if cfg["best_metric"] in GENERATION_METRICS and not cfg["eval_generate"]:
            raise SystemExit(f"jlora: --best-metric {cfg['best_metric']} is a generation metric; it needs "
                             f"--eval-generate N (validation prompts decoded at each evaluation)")
    _check_value("rules", "optional_str", cfg["rules"], bad)
    if cfg["mesh"] is not None:
        parse_mesh(cfg["mesh"])
    elif cfg["rules"] is not None:
        raise SystemExit("jlora: --rules needs --mesh (the mesh whose axes the rules name)")
    if cfg["early_stopping"] and cfg["best_metric"] is None:
        raise SystemExit("jlora: --early-stopping needs --best-metric (the metric whose improvement it waits for)")


def parse_mesh(text) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """``"data=2,fsdp=4"`` -> ``((2, 4), ("data", "fsdp"))``; a clear error for anything else."""
    try:
        return shd.parse_mesh(text)
    except ValueError as e:
        raise SystemExit(f"jlora: --mesh {e}") from None


def _sharding(cfg: dict, task):
    """(mesh, rules, batch_axes) for --mesh / --rules, or (None, None, ("data",)). With many
    processes and no --mesh: data parallelism over every device (data=-1)."""
    if cfg["mesh"] is None and jax.process_count() == 1:
        return None, None, ("data",)
    shape, names = parse_mesh(cfg["mesh"] or "data=-1")
    try:
        mesh = make_mesh(shape, names)
    except ValueError as e:
        raise SystemExit(f"jlora: --mesh {cfg['mesh']}: {e}") from None
    if cfg["rules"]:
        try:
            rules = load_rules(cfg["rules"])
        except ValueError as e:
            raise SystemExit(f"jlora: --rules: {e}") from None
    else:
        config = getattr(task.model, "config", None)
        if not hasattr(config, "partition_rules"):
            raise SystemExit(f"jlora: --mesh: the model {cfg['model']!r} has no partition rules; pass --rules FILE")
        rules = resolve_rules(config.partition_rules(), mesh)
    batch_axes = tuple(a for a in ("data", "fsdp") if a in mesh.shape) or (names[0],)
    split = math.prod(mesh.shape[a] for a in batch_axes)
    per_micro = cfg["batch"] // cfg["accum_steps"]
    if per_micro % split or cfg["batch"] % jax.process_count():
        raise SystemExit(f"jlora: --batch {cfg['batch']} (/ --accum-steps {cfg['accum_steps']}) does not split over the "
                         f"{split} devices of mesh axes {batch_axes} and {jax.process_count()} process(es); use a multiple "
                         f"of {math.lcm(split * cfg['accum_steps'], jax.process_count())}")
    return mesh, rules, batch_axes


def _dry_run(cfg: dict, task, step, trainable, frozen, opt_state, log=print) -> dict:
    """Prints each array's global and per-device shape and the compiled step's memory per device."""
    # the global batch's shapes (with many processes a batches() call would give this process's rows)
    abstract = {k: jax.ShapeDtypeStruct((cfg["batch"],) + np.shape(v)[1:], np.asarray(v).dtype)
                for k, v in task.arrays["train"].items()}
    if step.shardings is not None:
        t_sh, f_sh = step.shardings(trainable, frozen, opt_state, abstract)[:2]
    else:
        t_sh = f_sh = None
    for half, tree, shardings in (("trainable", trainable, t_sh), ("frozen", frozen, f_sh)):
        leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
        shard_leaves = (jax.tree_util.tree_leaves(shardings) if shardings is not None else [None] * len(leaves))
        for (path, x), sh in zip(leaves, shard_leaves):
            shape = tuple(np.shape(x))
            local = tuple(sh.shard_shape(shape)) if sh is not None else shape
            spec = tuple(sh.spec) if sh is not None else ()
            log(f"{half:9s} {jax.tree_util.keystr(path):70s} {str(shape):18s} per device {str(local):18s} {spec}")
    try:
        mem = step.memory(trainable, frozen, opt_state, abstract, jax.random.key(0))
    except Exception as e:   # noqa: BLE001 - say what failed; nothing was trained
        raise SystemExit(f"jlora: --dry-run: the step does not compile: {str(e).splitlines()[0]}") from None
    gib = lambda b: f"{b / 2 ** 30:.3f} GiB"
    log(f"compiled step, per device: arguments {gib(mem['argument'])}, outputs {gib(mem['output'])} "
        f"({gib(mem['alias'])} written over donated inputs), temporaries {gib(mem['temp'])}, peak {gib(mem['peak'])} "
        f"on {jax.device_count()} x {jax.devices()[0].device_kind}")
    return mem


def _check_value(name: str, kind: str, value, bad, choices=()) -> None:
    """``value`` checked against a ``CliField`` kind (jlora.core.spec.CLI_KINDS); ``bad`` names the flag."""
    if kind == "positive_int" and (not _is_int(value) or value < 1):
        bad(name, value, "a positive integer")
    elif kind == "int>=0" and (not _is_int(value) or value < 0):
        bad(name, value, "an integer >= 0")
    elif kind == "optional_positive_int" and value is not None and (not _is_int(value) or value < 1):
        bad(name, value, "a positive integer")
    elif kind == "positive_number" and (not _is_number(value) or value <= 0):
        bad(name, value, "a positive number")
    elif kind == "number>=0" and (not _is_number(value) or value < 0):
        bad(name, value, "a number >= 0")
    elif kind == "choice" and value not in choices:
        bad(name, value, f"one of {choices}")
    elif kind == "optional_str" and value is not None and (not isinstance(value, str) or not value):
        bad(name, value, "a non-empty string")
    elif kind == "flag_off" and not isinstance(value, bool):
        bad(name, value, "true or false")


#: the argparse type of each CliField kind that takes a value (choices and flag_off are handled apart)
_KIND_TYPES = {"positive_int": int, "int>=0": int, "optional_positive_int": int, "positive_number": float,
               "number>=0": float, "optional_str": str}


#: validation metrics --best-metric can select on, and whether larger is better
BEST_METRICS = {"loss": False, "accuracy": True, "macro_f1": True, "perplexity": False,
                **{m: True for m in GENERATION_METRICS}}


def make_task(cfg: dict):
    """The task (model + data + loss + evaluation) for a config; bad models or data exit with the reason."""

    try:
        return _make(cfg["model"], cfg["data"], max_length=cfg["max_length"], seed=cfg["seed"],
                     scan_layers=cfg["scan_layers"], remat=cfg["remat"], options={k: cfg[k] for k in DATA_KEYS},
                     param_dtype=cfg["param_dtype"], loss_chunk=cfg["loss_chunk"],
                     attention=cfg["attention"], fuse_projections=cfg["fuse_projections"])
    except (ValueError, FileNotFoundError, DataFileError) as e:
        raise SystemExit(f"jlora: {e}") from None


def build(cfg: dict, task=None):
    """(task, adapted params, spec or None) for a config."""


    if task is None:
        task = make_task(cfg)
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
        model_fn = task.model.apply if cfg["scan_layers"] else None
        adapted = jlora.apply(params, spec, jax.random.key(cfg["seed"]), model=model_fn,
                              example=task.example() if model_fn else None)
    except ValueError as e:   # a rank larger than a module, targets that match nothing ...
        raise SystemExit(f"jlora: {e}") from None
    return task, adapted, spec


def _method_spec(cfg: dict, common: dict, task):
    """The jlora spec for --method, built by the method's own ``from_cli``."""
    context = types.SimpleNamespace(family=task.family, task=task, calibration=lambda: _calibration(cfg, task))
    return METHOD_SPECS[cfg["method"]].from_cli(cfg, common, context)


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


    try:
        spec = _method_spec(cfg, {}, task)
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


    if dtype in (None, "float32"):
        return params
    target = jnp.dtype(dtype)
    flat, treedef = flatten_with_paths(params)
    leaves = [leaf if (not jnp.issubdtype(leaf.dtype, jnp.floating) or (head_pattern and matches(path, (head_pattern,))))
              else leaf.astype(target) for path, leaf in flat]
    return jax.tree_util.tree_unflatten(treedef, leaves)


def make_optimizer(cfg: dict):
    """(optax optimizer, learning-rate schedule) for --optimizer / --schedule / --warmup-* / --clip-norm /
    --weight-decay: linear warm-up from 0 to --lr, then constant, linear to 0, or cosine to 0."""

    steps, lr = cfg["steps"], cfg["lr"]
    warm = cfg["warmup_steps"] if cfg["warmup_steps"] is not None else int(cfg["warmup_ratio"] * steps)
    if steps == 1:   # nothing to warm up or decay
        schedule = optax.constant_schedule(lr)
    elif cfg["schedule"] == "cosine":   # jlora's historical default: at least one warm-up step
        schedule = optax.warmup_cosine_decay_schedule(0.0, lr, min(max(1, warm), steps - 1), steps)
    else:
        decay = (optax.constant_schedule(lr) if cfg["schedule"] == "constant"
                 else optax.linear_schedule(lr, 0.0, max(1, steps - warm)))
        schedule = decay if warm == 0 else optax.join_schedules([optax.linear_schedule(0.0, lr, warm), decay], [warm])
    wd = cfg["weight_decay"]
    if cfg["optimizer"] == "adamw":
        opt = optax.adamw(schedule, weight_decay=wd)
    elif cfg["optimizer"] == "lion":
        opt = optax.lion(schedule, weight_decay=wd)
    elif cfg["optimizer"] == "adafactor":
        opt = optax.adafactor(schedule, weight_decay_rate=wd or None)
    else:
        opt = optax.chain(optax.add_decayed_weights(wd), optax.sgd(schedule, momentum=0.9)) if wd else \
            optax.sgd(schedule, momentum=0.9)
    if cfg["clip_norm"]:
        opt = optax.chain(optax.clip_by_global_norm(cfg["clip_norm"]), opt)
    return opt, schedule


def _default_out(cfg: dict) -> pathlib.Path:
    name = lambda v: pathlib.Path(str(v).rstrip("/")).stem.replace(":", "_") or "run"  # noqa: E731
    return pathlib.Path(f"runs/{name(cfg['model'])}-{name(cfg['data'])}-{cfg['method']}")


def _portable(cfg: dict) -> dict:
    """The config as written to config.json: model and data files as absolute paths, so a run can be
    evaluated, exported and resumed from any working directory."""

    out = dict(cfg)
    if out["model"] not in ("minilm", "smollm2"):
        out["model"] = str(pathlib.Path(out["model"]).resolve())
    if looks_like_file(out["data"]):
        out["data"] = str(pathlib.Path(out["data"]).resolve())
    for key in ("validation_file", "test_file"):
        if out[key]:
            out[key] = str(pathlib.Path(out[key]).resolve())
    return out


def _prepare_out(out: pathlib.Path, cfg: dict, overwrite: bool, resume: bool | None) -> bool:
    """Creates ``out`` or checks it may be reused; True when an interrupted run is to be resumed
    (``resume=True`` demands one, ``False`` refuses one, ``None`` resumes one if there is one).
    With many processes every process reads the directory as it was and takes the same decision
    (or raises the same error); process 0 alone writes, between barriers."""
    resuming, replace = _out_decision(out, cfg, overwrite, resume)
    barrier("jlora-cli-out-read")
    if not resuming and is_main_process():
        if replace:
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        _write_json(out / "config.json", cfg)
    barrier("jlora-cli-out-written")
    return resuming


def _out_decision(out: pathlib.Path, cfg: dict, overwrite: bool, resume: bool | None) -> tuple[bool, bool]:
    """(resume the run in ``out``, replace what is there) from the files alone; nothing is written."""
    interrupted = (out / "config.json").is_file() and not (out / "results.json").is_file()
    if resume and not overwrite and not interrupted:
        raise SystemExit(f"jlora: --resume: {out} holds no interrupted run "
                         f"({'it is finished' if (out / 'results.json').is_file() else 'no config.json'})")
    if out.exists() and not out.is_dir():
        raise SystemExit(f"jlora: --out {out} is a file, not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not (out / "config.json").is_file():
            raise SystemExit(f"jlora: --out {out} holds files that are not a jlora run; choose another --out")
        if overwrite:
            return False, True
        if (out / "results.json").is_file():
            raise SystemExit(f"jlora: {out} already holds a finished run; choose another --out, or pass --overwrite "
                             "to replace it")
        if resume is False:
            raise SystemExit(f"jlora: {out} holds an interrupted run; run without --no-resume to continue it, or "
                             "pass --overwrite to start again")
        saved = json.loads((out / "config.json").read_text())
        # a setting the saved run predates ran at its default
        diff = sorted(k for k in set(saved) | set(cfg)
                      if k not in RESUMABLE_CHANGES and saved.get(k, DEFAULTS.get(k)) != cfg.get(k))
        if diff:
            raise SystemExit(f"jlora: {out} holds an interrupted run with other settings: "
                             + ", ".join(f"{k}: {saved.get(k)!r} there, {cfg.get(k)!r} now" for k in diff[:6])
                             + "; use the same settings to resume it, or --overwrite to start again")
        return True, False
    return False, False


def _write_json(path: pathlib.Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


class _StopFlag:
    """SIGTERM / SIGINT set a reason the training loop reads after each step (so it checkpoints and
    stops cleanly); early stopping sets one too."""

    def __init__(self):
        self.reason, self.signalled, self._old = None, None, {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:   # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        if self.signalled is not None:   # a second signal: stop at once
            raise KeyboardInterrupt
        self.signalled = signal.Signals(signum).name
        self.reason = self.signalled

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def __call__(self):
        return self.reason


def _read_history(path: pathlib.Path, upto: int) -> list[dict]:
    """metrics.jsonl records up to step ``upto``; the file is rewritten without later ones (steps a
    killed run logged after its last checkpoint are recomputed, not duplicated)."""
    if not path.is_file():
        return []
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:   # a line cut by the kill
            continue
        if record.get("step", math.inf) <= upto:
            kept.append(record)
    if is_main_process():   # one writer; the others read the same records
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, path)
    return kept


def train(cfg: dict, task=None, log=print, *, overwrite: bool = False, resume: bool | None = None,
          dry_run: bool = False) -> dict:
    """Runs one training configuration end to end; returns the results dict.

    Into a directory that holds an interrupted run (``config.json`` but no ``results.json``) with the
    same settings, it resumes from the newest good checkpoint (``resume=False`` refuses; ``True``
    requires such a run); a finished run is replaced only with ``overwrite``. SIGTERM / Ctrl-C save a checkpoint and exit 143 / 130.
    """


    out = pathlib.Path(cfg["out"]) if cfg["out"] else _default_out(cfg)
    t0 = time.perf_counter()
    task, adapted, spec = build(cfg, task)   # bad models, data and settings fail before anything is written
    if cfg["eval_generate"] and task.kind != "instruction":
        raise SystemExit(f"jlora: --eval-generate {cfg['eval_generate']} decodes replies of a language model; "
                         f"this run's model is a {task.kind} model (its metrics are accuracy and macro_f1)")
    mesh, rules, batch_axes = _sharding(cfg, task)
    lifted = jlora.lift(task.model.apply)
    optimizer, schedule = make_optimizer(cfg)
    trainable, frozen = jlora.partition(adapted)
    alloc = jlora.adalora_allocator(spec) if cfg["method"] == "adalora" else None  # runs inside the step
    step = make_step(task.loss_fn(lifted), optimizer, accum_steps=cfg["accum_steps"], adapter_update=alloc,
                     mesh=mesh, rules=rules, batch_axes=batch_axes)
    if dry_run:
        return {"dry_run": _dry_run(cfg, task, step, trainable, frozen, jax.eval_shape(step.init, trainable), log)}
    resuming = _prepare_out(out, _portable(cfg), overwrite, resume)
    main = is_main_process()   # with many processes, process 0 writes the run's files and logs
    if not main:
        log = lambda *a, **k: None   # noqa: E731
    summary = jlora.summary(adapted)
    if main:
        (out / "summary.txt").write_text(summary + "\n")
    counts = jlora.count(adapted)
    log(summary.splitlines()[-1])
    if mesh is not None:   # the frozen weights laid out once, not re-placed every step
        trainable, frozen = shard(trainable, mesh, rules), shard(frozen, mesh, rules)
    opt_state = init_opt_state(optimizer, trainable, adapter_update=alloc, mesh=mesh, rules=rules)
    key = jax.random.key(cfg["seed"] + 1)
    best_metric = cfg["best_metric"]
    larger_better = BEST_METRICS.get(best_metric, False)
    # the checkpointed extras: PRNG key, data position, and (with --best-metric) the best adapter so far
    extra = {"key": key, "data_position": np.int32(0)}
    if best_metric:
        extra.update(best_value=np.float32(0.0), best_step=np.int32(0), evals_since_best=np.int32(0))  # step 0: none yet
    state = {"trainable": trainable, "best": trainable if best_metric else None}

    manager = jio.checkpoint_manager(out / "checkpoints", max_to_keep=cfg["keep_checkpoints"])
    start, history = 0, []
    if resuming and manager.all_steps():
        restored = jio.restore_state(manager, state, opt_state, extra)
        start, state, opt_state, extra = restored.step, restored.trainable, restored.opt_state, restored.rng
        if int(extra["data_position"]) != start:
            raise SystemExit(f"jlora: checkpoint step {start} in {out} records data position "
                             f"{int(extra['data_position'])}; the checkpoint is inconsistent")
        key = extra["key"]
        log(f"resuming {out} from step {start} of {cfg['steps']}")
    history = _read_history(out / "metrics.jsonl", start) if resuming else []
    reference = next((r["loss"] for r in history if r["step"] == 1), None)
    best = {k: extra[k] for k in ("best_value", "best_step", "evals_since_best")} if best_metric else {}
    best_tree = state["best"]
    stop = _StopFlag()
    writer = None
    if cfg["logdir"] and main:
        from tensorboardX import SummaryWriter

        writer = SummaryWriter(cfg["logdir"], purge_step=start + 1 if start else None)

    def eval_fn(t):
        nonlocal best_tree
        generate = {"generate": cfg["eval_generate"], "max_new_tokens": cfg["eval_max_new_tokens"]} \
            if cfg["eval_generate"] else {}
        metrics = task.evaluate(lifted, jlora.combine(t, frozen), "validation", limit=cfg["eval_limit"], **generate)
        if best_metric:
            if best_metric not in metrics:
                raise SystemExit(f"jlora: --best-metric {best_metric} is not measured for this task; "
                                 f"measured: {sorted(metrics)}")
            value = float(metrics[best_metric])
            old = float(best["best_value"])
            better = int(best["best_step"]) == 0 or (value > old if larger_better else value < old)
            if better:
                best_tree = jax.tree_util.tree_map(lambda x: x.copy() if hasattr(x, "copy") else x, t)
                best.update(best_value=np.float32(value), best_step=np.int32(current["step"]),
                            evals_since_best=np.int32(0))
            else:
                best["evals_since_best"] = np.int32(int(best["evals_since_best"]) + 1)
                if cfg["early_stopping"] and int(best["evals_since_best"]) >= cfg["early_stopping"]:
                    stop.reason = stop.reason or (f"early stopping: {cfg['early_stopping']} evaluations without a "
                                                  f"better validation {best_metric} than step {int(best['best_step'])}")
        return metrics

    current = {"step": start}

    def on_record(record):
        record["lr"] = float(schedule(record["step"] - 1))
        if writer is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step" and math.isfinite(v):
                    writer.add_scalar(k if k.startswith("eval_") else f"train/{k}", v, record["step"])
            writer.flush()

    def checkpoint(i, t, o, k):
        extras = {"key": k, "data_position": np.int32(i), **best}
        # waits until the step is on disk: a kill right after loses nothing before it (an async save two
        # steps old was lost to SIGKILL in tools/robustness.py); for an adapter's state this takes milliseconds
        jio.save_state(manager, i, {"trainable": t, "best": best_tree if best_metric else None}, o, extras, wait=True)

    def count_step(fn):   # the eval callback needs the step it is evaluating
        def wrapped(*a):
            current["step"] += 1
            return fn(*a)
        wrapped.log_metrics = getattr(fn, "log_metrics", ())
        return wrapped

    stream = batches(task.arrays["train"], cfg["batch"], seed=cfg["seed"], epochs=None, start=start)
    setup_s = time.perf_counter() - t0
    trainable, new = state["trainable"], []
    task.sealed = {"test"}   # validation selects; the test split is read once, below, on the final adapter
    try:
        with stop:
            if start < cfg["steps"]:   # else: killed after its last checkpoint, before the results
                trainable, opt_state, new = jlora.train.fit(   # looked up per call (tests wrap it)
                    count_step(step), trainable, frozen, opt_state, stream, cfg["steps"], key,
                    tokens_per_batch=cfg["batch"] * task.tokens_per_example(), log_path=str(out / "metrics.jsonl"),
                    eval_fn=eval_fn, eval_every=cfg["eval_every"] or None, progress=cfg["progress"],
                    desc=f"{cfg['method']} {pathlib.Path(cfg['model']).name}/{pathlib.Path(cfg['data']).name}",
                    diverge_factor=10.0, log_every=cfg["log_every"], start_step=start, checkpoint=checkpoint,
                    max_consecutive_skips=cfg["max_nonfinite"],
                    checkpoint_every=cfg["checkpoint_every"] or None, should_stop=stop, reference_loss=reference,
                    on_record=on_record)
    except FloatingPointError as e:  # a diverged run saves no adapter and exits non-zero
        raise SystemExit(f"jlora: training stopped, no adapter saved: {e}") from None
    finally:
        task.sealed = set()
        manager.wait_until_finished()
        manager.close()
        if writer is not None:
            writer.close()
    if stop.signalled:
        print(f"jlora: {stop.signalled} at step {new[-1]['step']}: training state saved in {out / 'checkpoints'}; "
              f"run the same command again to resume", file=sys.stderr)
        raise SystemExit(143 if stop.signalled == "SIGTERM" else 130)
    history += new
    if best_metric and int(best["best_step"]) > 0:
        trainable = best_tree
        log(f"keeping the adapter of step {int(best['best_step'])}: validation {best_metric} "
            f"{float(best['best_value']):.4f}")
    adapted = jlora.combine(trainable, frozen)
    # prompt methods: the saved adapter holds the final prompt / prefix (reparameterisations dropped)
    adapted = jlora.export_prompt(adapted)
    jio.save_adapter(str(out / "adapter"), adapted, spec=spec, overwrite=True)
    test = task.evaluate(lifted, adapted, "test", limit=cfg["eval_limit"])
    timed = [r for r in new if r["step"] > new[0]["step"]] if new else []
    evals = [r for r in history if any(k.startswith("eval_") for k in r)]
    results = {
        "config": cfg, "trainable_params": counts["trainable"], "total_params": counts["total"],
        "trainable_percent": 100.0 * counts["trainable"] / counts["total"],
        "adapter_bytes_on_disk": _dir_bytes(out / "adapter"),
        "validation": {k: v for k, v in (evals[-1] if evals else {}).items() if k.startswith("eval_")},
        "test": test, "final_train_loss": history[-1]["loss"], "steps_done": history[-1]["step"],
        "skipped_steps": history[-1].get("skipped", 0), "resumed_from_step": start or None,
        "stopped": history[-1].get("stopped"),
        "steps_per_s": (timed[-1]["step"] - new[0]["step"]) / (timed[-1]["elapsed_s"] - new[0]["elapsed_s"]) if timed else None,
        "setup_s": setup_s, "wall_s": time.perf_counter() - t0, "data_fingerprint": data_fingerprint(task),
    }
    if best_metric:
        results["best"] = {"metric": best_metric, "step": int(best["best_step"]), "value": float(best["best_value"])}
    if cfg["method"] == "adalora":

        results["adalora_ranks"] = kept_ranks(adapted)
    if main:
        plot_history(history, str(out / "plot.png"), title=f"{cfg['method']} on {pathlib.Path(cfg['model']).name}/"
                     f"{pathlib.Path(cfg['data']).name}")
        _write_json(out / "results.json", results)   # last: marks the run finished
    barrier("jlora-cli-finished")
    log(f"test accuracy {test['accuracy']:.4f}  test loss {test['loss']:.4f}  -> {out}" if "accuracy" in test
        else f"test loss {test['loss']:.4f}  -> {out}")
    results["_adapted"] = adapted
    results["_task"] = task
    return results


#: the Hub names of the bundled checkpoints (what PEFT's AutoPeftModel loads as the base)
HUB_NAMES = {"minilm": "sentence-transformers/all-MiniLM-L6-v2", "smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct"}


def data_fingerprint(task) -> dict:
    """sha256 of each split's model inputs (the tokenised arrays, or the images), so a later
    evaluation can prove it reads the rows the run was split into."""
    out = {}
    for split, arrays in task.arrays.items():
        h = hashlib.sha256()
        for key in sorted(arrays):
            a = np.ascontiguousarray(arrays[key])
            h.update(f"{key}:{a.dtype}:{a.shape};".encode())
            h.update(a.tobytes())
        out[split] = h.hexdigest()
    return out


def check_data_unchanged(run, task) -> None:
    """Refuses to evaluate ``run`` on splits other than those it trained with: a changed data file
    or loader would move training rows into the test split without a word."""
    results = pathlib.Path(run) / "results.json"
    saved = json.loads(results.read_text()).get("data_fingerprint") if results.is_file() else None
    if not saved:   # a run from before fingerprints: nothing to compare
        return
    now = data_fingerprint(task)
    changed = sorted(k for k in saved if now.get(k) != saved[k])
    if changed:
        raise SystemExit(f"jlora: the {', '.join(changed)} split(s) of {run} are not the rows the run was trained and "
                         f"selected with (the data file, the tokenizer or jlora's splitting changed since); evaluating "
                         f"them could mix training rows into the test split. Re-train, or evaluate with the data as it was")


def evaluate_run(run, options: "jeval.EvalOptions | None" = None, out_dir=None) -> dict:
    """:func:`jlora.eval.evaluate` on a finished run directory (what ``jlora evaluate --run`` does):
    its final (or best) adapter against the pretrained weights it was trained from, on the splits it
    was trained with (checked), the report written to ``out_dir`` (default ``<run>/evaluation``) as
    ``evaluation.json`` and ``evaluation.md`` beside the plots and the review sheet."""
    options = options or jeval.EvalOptions()
    cfg, task, adapted = _load_run(str(run))
    check_data_unchanged(run, task)
    base = _cast_frozen(task.params, cfg["param_dtype"], task.head) if options.base else None
    out = pathlib.Path(out_dir) if out_dir is not None else pathlib.Path(run) / "evaluation"
    report = jeval.evaluate(task, jlora.lift(task.model.apply), adapted, base, options, out)
    report["run"] = str(run)
    report["base_model"] = {"model": cfg["model"], "weights": f"the pretrained weights as trained on ({cfg['param_dtype']})"
                            + ("; its classification head is the untrained one the run started from"
                               if task.kind == "classification" else "")}
    title = (f"evaluation of {pathlib.Path(run).name}: {cfg['method']} on {pathlib.Path(str(cfg['model'])).name} / "
             f"{pathlib.Path(str(cfg['data'])).name}")
    (out / "evaluation.md").write_text(jeval.report_markdown(report, title))
    _write_json(out / "evaluation.json", report)
    return report


def _base_model_name(model: str) -> str | None:
    """``base_model_name_or_path`` for an exported PEFT config: the Hub name of a bundled model, the
    directory of a local one; None for a GGUF file (transformers cannot load one as a PEFT base)."""
    if model in HUB_NAMES:
        return HUB_NAMES[model]
    return None if str(model).endswith(".gguf") else str(pathlib.Path(model).resolve())


def _dir_bytes(path) -> int:
    return sum(f.stat().st_size for f in pathlib.Path(path).rglob("*") if f.is_file())


def _load_run(run: str):

    run = pathlib.Path(run)
    if not (run / "config.json").is_file():
        raise SystemExit(f"jlora: {run} is not a run directory (no config.json)")
    cfg = {**DEFAULTS, **json.loads((run / "config.json").read_text())}
    if not (run / "adapter").is_dir():
        raise SystemExit(f"jlora: {run} has no adapter/ (the run has not finished; run its train command again "
                         "to resume it)")
    task = make_task(cfg)
    params = _cast_frozen(task.params, cfg["param_dtype"], task.head)   # the frozen weights as trained (bf16 ...)
    if cfg["method"] != "qlora":   # jlora.io.load_adapter restores a saved prompt too
        adapted = jio.load_adapter(str(run / "adapter"), params)
    else:   # the NF4 / int base rebuilt as in training (quantisation is deterministic), the adapter on it

        _, template, _ = build(cfg, task)
        adapted = jio.load_adapter(str(run / "adapter"), template)
    return cfg, task, adapted


def _read_inputs(items: list, path: str | None, column: str, what: str) -> list[str]:
    """Texts from repeated flags and a file: .txt (one a line) or any --data format (a column)."""
    texts = [str(t) for t in items]
    if path:

        if path.endswith(".txt"):
            if not os.path.isfile(path):
                raise SystemExit(f"jlora: {what} file {path} does not exist")
            texts += [line for line in pathlib.Path(path).read_text().splitlines() if line.strip()]
        else:
            try:
                ds = files.read_table(path)
                files.require_columns(ds, [column], f"{what} file {path}", (f"--{column.split('_')[0]}-column",))
            except files.DataFileError as e:
                raise SystemExit(f"jlora: {e}") from None
            texts += [str(t) for t in ds[column]]
    return texts


def _infer(args) -> None:
    """``jlora generate`` / ``jlora predict``: JSON lines, one per input, to stdout or ``--out``."""

    for name in ("batch", "max_new_tokens"):
        value = getattr(args, name, 1)
        if value < 1:
            raise SystemExit(f"jlora: --{name.replace('_', '-')} must be a positive integer, got {value}")
    cfg, task, adapted = _load_run(args.run)
    lifted = jlora.lift(task.model.apply)
    generating = args.command == "generate"
    if generating != (task.kind == "instruction"):
        raise SystemExit(f"jlora: {args.run} is a run of a {task.kind} task; use jlora "
                         f"{'predict' if task.kind == 'classification' else 'generate'}")
    sink = open(args.out, "w") if args.out else sys.stdout

    def emit(records):
        for r in records:
            sink.write(json.dumps(r, ensure_ascii=False) + "\n")
        sink.flush()

    try:
        if generating:
            if args.temperature < 0 or (args.top_p is not None and not 0 < args.top_p <= 1):
                raise SystemExit(f"jlora: --temperature must be >= 0 and --top-p in (0, 1], got {args.temperature}, "
                                 f"{args.top_p}")

            def reply(prompts):
                return [{"prompt": p, "completion": c} for p, c in zip(prompts, task.generate_batch(
                    lifted, adapted, prompts, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p, seed=args.seed))]

            prompts = _read_inputs(args.prompt, args.prompts_file, args.prompt_column, "prompts")
            if not prompts and not args.interactive:
                raise SystemExit("jlora: generate needs --prompt, --prompts-file or --interactive")
            for s in range(0, len(prompts), args.batch):
                emit(reply(prompts[s:s + args.batch]))
            if args.interactive:
                for line in sys.stdin:
                    if line.strip():
                        emit(reply([line.rstrip("\n")]))
        else:
            if task.family == "vit":
                texts = _read_inputs(args.image, args.file, args.image_column, "images")
                base = pathlib.Path(args.file).resolve().parent if args.file else pathlib.Path.cwd()
                texts = [t if os.path.isabs(t) or t in args.image else str(base / t) for t in texts]
            else:
                texts = _read_inputs(args.text, args.file, args.text_column, "texts")
            if not texts:
                raise SystemExit("jlora: predict needs --text / --image or --file")
            try:
                probs = task.predict(lifted, adapted, texts, batch_size=args.batch)
            except ValueError as e:
                raise SystemExit(f"jlora: {e}") from None
            names = list(task.label_names)
            emit({("image" if task.family == "vit" else "text"): t, "label": names[int(p.argmax())],
                  "probabilities": {n: round(float(q), 6) for n, q in zip(names, p)}} for t, p in zip(texts, probs))
    finally:
        if args.out:
            sink.close()


def _hf_files(cfg: dict, task) -> tuple[dict, dict]:
    """(config.json contents, {file name: source}) for ``export --format hf``: the source
    directory's config and tokenizer files, or, for a GGUF model, ones written from its metadata."""

    if task.family in ("bert", "vit"):

        src = pathlib.Path(cfg["model"]) if cfg["model"] != "minilm" else assets.path("minilm", "model")
    else:
        src = None if cfg["model"] == "smollm2" or str(cfg["model"]).endswith(".gguf") else pathlib.Path(cfg["model"])
    if src is not None:
        config = json.loads((src / "config.json").read_text())
        names = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "chat_template.jinja",
                 "generation_config.json", "tokenizer.model", "preprocessor_config.json")
        files = {n: src / n for n in names if (src / n).is_file()}
    else:
        mc = task.model.config
        config = llama_config_json(mc, "qwen2" if mc.attention_bias and mc.attention_out_bias is False else "llama")
        fmt = task.text_format
        files = {"tokenizer.json": task.tokenizer.to_str(),
                 "tokenizer_config.json": json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                      "chat_template": fmt.chat_template, "bos_token": fmt.bos_token,
                                                      "eos_token": fmt.eos_token, "pad_token": fmt.pad_token}, indent=2)}
    if task.family in ("bert", "vit"):
        config["architectures"] = ["BertForSequenceClassification" if task.family == "bert" else
                                   "ViTForImageClassification"]
        config["id2label"] = {str(i): str(n) for i, n in enumerate(task.label_names)}
        config["label2id"] = {str(n): i for i, n in enumerate(task.label_names)}
        config.pop("num_labels", None)
    return config, files


def _export(fmt: str, out: str, cfg: dict, task, adapted, *, dtype=None, max_shard_bytes: int = 5 * 1024 ** 3) -> None:

    if fmt == "hf":

        if cfg["method"] in PROMPT_METHODS:
            raise ValueError(f"a {cfg['method']} run has no merged weights (its prompt is an input, not a weight); "
                             "export it with --format peft or adapter")
        dtype = dtype or ("bfloat16" if cfg["method"] == "qlora" else cfg["param_dtype"])
        tensors = hf_tensors(jlora.merge(adapted), task.family, task.model.config, dtype=dtype)
        config, files = _hf_files(cfg, task)
        save_hf_directory(out, tensors, config, files=files, max_shard_bytes=max_shard_bytes)
    elif fmt == "merged":
        jio.save_merged(out, adapted)
    elif fmt == "adapter":
        jio.save_adapter(out, adapted)
    else:
        spec = None
        if cfg["method"] == "adalora":    # the schedule and init_r go into the AdaLoraConfig
            targets = task.targets.get(cfg["targets"], cfg["targets"])
            spec = _method_spec(cfg, {"targets": targets, "exclude": None, "train_also": task.head}, task)
        jio.save_peft(out, adapted, task.naming, task_type=getattr(task, "peft_task_type", None), spec=spec,
                      base_model_name_or_path=_base_model_name(cfg["model"]))


def _estimate_spec(cfg: dict):
    """The adapter spec of --method for jlora's Llama (what build() would make, without the model)."""
    if cfg["method"] in PROMPT_METHODS or cfg["method"] == "head":
        raise SystemExit(f"jlora: estimate plans adapter methods ({', '.join(m for m in METHODS if m not in PROMPT_METHODS and m != 'head')}); "
                         f"got --method {cfg['method']}")
    common = dict(rank=cfg["rank"], alpha=cfg["alpha"], targets=LLAMA_TARGETS.get(cfg["targets"], cfg["targets"]),
                  exclude=None, rslora=cfg["rslora"], init=cfg["init"], dropout=cfg["dropout"], train_also=None)

    def no_data():
        raise SystemExit(f"jlora: --method {cfg['method']} with this selection needs data; estimate the memory with "
                         f"--method lora at the same rank")

    context = types.SimpleNamespace(family="llama", task=None, calibration=no_data)
    try:
        return METHOD_SPECS[cfg["method"]].from_cli(cfg, common, context)
    except ValueError as e:
        raise SystemExit(f"jlora: {e}") from None


def _estimate_devices(args, cfg) -> int:
    """How many devices the estimate's mesh needs (to give a compile that many fake CPU devices)."""
    if cfg["mesh"]:
        shape, _ = parse_mesh(cfg["mesh"])
        if -1 in shape:
            raise SystemExit("jlora: estimate needs explicit --mesh sizes (no -1): there are no devices to fill it")
        return math.prod(shape)
    if args.devices:
        return args.devices
    if args.hardware:
        try:
            return planner.hardware(args.hardware).devices
        except ValueError as e:
            raise SystemExit(f"jlora: --hardware: {e}") from None
    return 1


def _estimate(args) -> int:
    """``jlora estimate``: the analytic breakdown (and the compiled figure with --compile), and with
    --hardware whether it fits, the largest batch and sequence length, and what to change."""
    cfg = load_config(args)
    if args.model is None and not args.config:
        cfg["model"] = "smollm2"
    if args.devices is not None and args.devices < 1:
        raise SystemExit(f"jlora: --devices must be a positive integer, got {args.devices}")
    n = _estimate_devices(args, cfg)
    if args.compile and n > 1 and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        # compile on n (fake) CPU devices when this machine has fewer; JAX reads the flag when it starts
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n}").strip()
    spec = _estimate_spec(cfg)
    mesh = cfg["mesh"] or ({"fsdp": n} if n > 1 else None)
    kwargs = dict(batch=cfg["batch"], seq=cfg["max_length"], mesh=mesh, remat=cfg["remat"], loss_chunk=cfg["loss_chunk"],
                  param_dtype=cfg["param_dtype"], optimizer=cfg["optimizer"], accum_steps=cfg["accum_steps"])
    if cfg["rules"]:
        raise SystemExit("jlora: estimate uses the model's own partition rules; --rules is not supported yet")
    try:
        model = cfg["model"]
        if args.hardware:
            hw = planner.hardware(args.hardware, devices=n if (args.devices or cfg["mesh"]) else None)
            verdict = planner.plan(model, spec, hardware=hw, compile=args.compile, **kwargs)
            est = verdict.estimate
        else:
            verdict, est = None, planner.estimate(model, spec, compile=args.compile, **kwargs)
    except (ValueError, FileNotFoundError, TypeError) as e:
        raise SystemExit(f"jlora: estimate: {e}") from None
    if args.json:
        out = verdict.as_dict() if verdict is not None else {"estimate": est.as_dict()}
        out["rule_of_thumb"] = planner.rule_of_thumb(est)
        print(json.dumps(out, indent=2, default=str))
    else:
        print(verdict.report() if verdict is not None else est.table())
        print(f"the field's rule of thumb ((weights + optimizer + gradients) x 1.3): "
              f"{planner.rule_of_thumb(est) / 2 ** 30:.3f} GiB per device")
    return 0


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
    p_exp.add_argument("--format", required=True, choices=("merged", "adapter", "peft", "hf"),
                       help="merged: jlora Orbax params; adapter: jlora adapter; peft: HF PEFT adapter files; hf: the "
                            "merged model as a Hugging Face directory (config.json, safetensors, tokenizer)")
    p_exp.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                       help="hf: tensor dtype (default: the run's --param-dtype; bfloat16 for qlora)")
    p_exp.add_argument("--max-shard-gb", type=float, default=5.0, help="hf: largest safetensors shard (default 5)")
    p_exp.add_argument("--out", required=True)
    p_gen = sub.add_parser("generate", help="replies of a language-model run (base + adapter) to prompts")
    p_gen.add_argument("--run", required=True)
    p_gen.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p_gen.add_argument("--prompts-file", help="prompts: a .txt file (one a line) or a data file with --prompt-column")
    p_gen.add_argument("--prompt-column", default="prompt", help="the column of --prompts-file (default prompt)")
    p_gen.add_argument("--interactive", action="store_true", help="read prompts from stdin, one a line, until EOF")
    add_decoding_args(p_gen)
    p_gen.add_argument("--out", help="write JSON lines here instead of stdout")
    p_pred = sub.add_parser("predict", help="class probabilities of a classification run for texts")
    p_pred.add_argument("--run", required=True)
    p_pred.add_argument("--text", action="append", default=[], help="a text (repeatable)")
    p_pred.add_argument("--file", help="texts: a .txt file (one a line) or a data file with --text-column")
    p_pred.add_argument("--text-column", default="text")
    p_pred.add_argument("--image", action="append", default=[], help="ViT runs: an image file (repeatable)")
    p_pred.add_argument("--image-column", default="image", help="ViT runs: the column of --file with image paths")
    p_pred.add_argument("--batch", type=int, default=64)
    p_pred.add_argument("--out", help="write JSON lines here instead of stdout")
    p_est = sub.add_parser("estimate", help="memory per device of a training run before running it: fits on your "
                                            "hardware? (the same flags as train)")
    _add_train_args(p_est)
    p_est.add_argument("--hardware", help="answer for this hardware: " + ", ".join(planner.HARDWARE) +
                       ", a TPU slice (v5e-8, v5e-64, v4-16) or GPUs with a count (h100-80g:8)")
    p_est.add_argument("--devices", type=int, help="devices to shard over (FSDP, --mesh fsdp=N) when --mesh is not given")
    p_est.add_argument("--compile", action="store_true",
                       help="also compile the real step on abstract inputs and print the compiler's figure")
    p_est.add_argument("--json", action="store_true", help="print JSON instead of tables")
    evaluate_cli.add_parser(sub)
    analyze_cli.add_parser(sub)
    data_check_cli.add_parser(sub)
    p_ins = sub.add_parser("inspect", help="print the adapter summary table for a run or a spec")
    p_ins.add_argument("--run")
    _add_train_args(p_ins)
    args = parser.parse_args(argv)
    if args.command == "estimate":
        return _estimate(args)
    if args.command == "evaluate":
        return evaluate_cli.main(args, evaluate_run)
    if args.command == "analyze":
        return analyze_cli.main(args, _load_run)
    if args.command == "data":
        return data_check_cli.main(args)

    if args.command == "train" and args.distributed:
        try:
            initialize()
        except (ValueError, RuntimeError) as e:
            raise SystemExit(f"jlora: --distributed: {e}") from None
    if args.command == "train":
        results = train(load_config(args), overwrite=args.overwrite, resume=args.resume, dry_run=args.dry_run)
        if args.dry_run or not is_main_process():
            return 0
        print(json.dumps({k: v for k, v in results.items() if not k.startswith("_") and k != "config"}, indent=2))
    elif args.command == "eval":
        cfg, task, adapted = _load_run(args.run)
        check_data_unchanged(args.run, task)
        metrics = task.evaluate(jlora.lift(task.model.apply), adapted, args.split, limit=args.limit)
        print(json.dumps({"run": args.run, "split": args.split, **metrics}, indent=2))
    elif args.command == "export":
        cfg, task, adapted = _load_run(args.run)
        try:
            _export(args.format, args.out, cfg, task, adapted, dtype=args.dtype,
                    max_shard_bytes=max(1, int(args.max_shard_gb * 1024 ** 3)))
        except ValueError as e:   # what a format cannot hold (PiSSA residuals in PEFT, a head-only run ...)
            raise SystemExit(f"jlora: cannot export {args.run} as {args.format}: {e}") from None
        print(f"wrote {args.format} to {args.out}")
    elif args.command in ("generate", "predict"):
        _infer(args)
    elif args.command == "inspect":
        if args.run:
            _, _, adapted = _load_run(args.run)
        else:
            _, adapted, _ = build(load_config(args))
        print(jlora.summary(adapted))
    return 0


if __name__ == "__main__":
    sys.exit(main())
