"""``jlora data check DATA``: a report on a data set before training on it (:mod:`jlora.data.check`).

DATA is a bundled set (``rotten_tomatoes``, ``bbc_news``, ``chatterbot``,
``natural_instructions:<subtask>``) or a CSV / TSV / JSON / JSONL / Parquet file, split as
``jlora train --data`` would split it (the same ``--seed``, ``--validation-file``, ``--test-file`` and
column flags). Lengths are counted with the tokenizer of ``--model`` (default: ``minilm`` for
classification data, ``smollm2`` for instruction data; ``none`` counts characters) and compared with
``--max-length`` (default: the train command's, 48). Only the tokenizer is built, never the weights.

Prints the report as Markdown (or JSON with ``--json``); ``--out DIR`` also writes
``data_check.json``, ``data_check.md`` and ``token_lengths.png`` there. ``--strict`` exits with 1 when
the report holds an error (test rows that are training rows, empty examples, ...): a gate for CI.
"""

from __future__ import annotations

import argparse
import json
import pathlib

from jlora import assets
from jlora import data as jdata
from jlora.cli.tasks import ModelError, resolve_model
from jlora.cli.tasks_lm import CHATML_JINJA
from jlora.data import check as dcheck
from jlora.data import files
from jlora.data.chat import TextFormat
from jlora.models.llama import SMOLLM2_GGUF, tokenizer_from_gguf

CLASSIFICATION_DATA = ("rotten_tomatoes", "bbc_news")
INSTRUCTION_DATA = ("chatterbot", "natural_instructions:<subtask>")
DEFAULT_MAX_LENGTH = 48          # the train command's --max-length default
COLUMN_FLAGS = ("text_column", "label_column", "prompt_column", "response_column", "messages_column")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Adds ``data`` (with its ``check`` subcommand) to the ``jlora`` subparsers; returns the ``data`` parser."""
    p_data = subparsers.add_parser("data", help="look at a data set before training on it")
    sub = p_data.add_subparsers(dest="data_command", required=True)
    p = sub.add_parser("check", help="report empty / duplicate / leaked / over-long examples, label balance, "
                                     "mixed templates and lengths",
                       description="A report on a data set before training: empty and over-long examples, "
                                   "duplicates and conflicting labels, exact and near-duplicate leakage across "
                                   "train / validation / test, label balance, template consistency, lengths.")
    p.add_argument("data", metavar="DATA", help="rotten_tomatoes | bbc_news | chatterbot | natural_instructions:"
                                                "<subtask> | a CSV / TSV / JSON / JSONL / Parquet file")
    p.add_argument("--model", help="tokenizer to count lengths with: minilm | smollm2 | a Hugging Face directory | a "
                                   ".gguf file | none (characters); default minilm for classification, smollm2 for "
                                   "instruction data")
    p.add_argument("--max-length", type=int, help=f"the training --max-length (default {DEFAULT_MAX_LENGTH}); longer "
                                                  "examples are reported as truncated")
    p.add_argument("--kind", choices=dcheck.KINDS, help="what the data is for (default: from the data set or the "
                                                        "file's columns)")
    p.add_argument("--seed", type=int, default=0, help="the split seed, as jlora train --seed (default 0)")
    p.add_argument("--validation-file", help="validation split (default: cut from DATA, seeded)")
    p.add_argument("--test-file", help="test split (default: cut from DATA, seeded)")
    p.add_argument("--text-column", help="classification text, or plain LM text (default: text)")
    p.add_argument("--label-column", help="classification label (default: label)")
    p.add_argument("--prompt-column", help="LM prompt (default: found among prompt / instruction / question / input)")
    p.add_argument("--response-column", help="LM response (default: response / completion / output / answer)")
    p.add_argument("--messages-column", help="LM chat conversations (default: messages)")
    p.add_argument("--near-dup-threshold", type=float, default=0.9,
                   help="word 5-gram Jaccard similarity at which examples in two splits count as near-duplicates "
                        "(default 0.9)")
    p.add_argument("--examples", type=int, default=3, help="examples shown per problem (default 3)")
    p.add_argument("--out", help="write data_check.json, data_check.md and token_lengths.png into this directory")
    p.add_argument("--json", action="store_true", help="print the JSON report instead of Markdown")
    p.add_argument("--strict", action="store_true", help="exit with status 1 when the report holds an error")
    return p_data


# --------------------------------------------------------------------------------------------
# data

def _bundled_kind(name: str) -> str | None:
    if name in CLASSIFICATION_DATA:
        return "classification"
    if name == "chatterbot" or name.startswith("natural_instructions:"):
        return "instruction"
    return None


def _columns(args, kind: str) -> dict:
    if kind == "classification":
        for flag in ("prompt_column", "response_column", "messages_column"):
            if getattr(args, flag):
                raise SystemExit(f"jlora: --{flag.replace('_', '-')} is for instruction data; classification data "
                                 "reads --text-column and --label-column")
        return {"text": args.text_column, "label": args.label_column}
    if args.label_column:
        raise SystemExit("jlora: --label-column is for classification data (--kind classification)")
    return {"text": args.text_column, "prompt": args.prompt_column, "response": args.response_column,
            "messages": args.messages_column}


def _file_kind(args, column_names) -> str:
    """Classification when the file has a label column (and no chat / prompt columns), else instruction."""
    if args.prompt_column or args.response_column or args.messages_column:
        return "instruction"
    cols = set(column_names)
    if "messages" in cols or any(p in cols and r in cols for p, r in dcheck.PAIRS):
        return "instruction"
    return "classification" if (args.label_column or "label") in cols else "instruction"


def load(args) -> tuple[dict, str, dict]:
    """``(splits, kind, columns)`` for DATA as ``jlora train`` would split it."""

    name = args.data
    kind = _bundled_kind(name)
    if kind is not None:
        if args.kind and args.kind != kind:
            raise SystemExit(f"jlora: data {name!r} is {kind} data; --kind {args.kind} does not fit it")
        given = [f"--{f.replace('_', '-')}" for f in COLUMN_FLAGS + ("validation_file", "test_file")
                 if getattr(args, f)]
        if given:
            raise SystemExit(f"jlora: {', '.join(given)} apply to a data file; {name!r} is a bundled set")
        try:
            if kind == "classification":
                splits = {"rotten_tomatoes": jdata.rotten_tomatoes, "bbc_news": jdata.bbc_news}[name](seed=args.seed)
            else:
                splits = jdata.instruction_data(name, seed=args.seed)
        except (ValueError, KeyError, OSError, RuntimeError) as e:
            raise SystemExit(f"jlora: data {name!r} could not be loaded: {e}") from None
        return dict(splits), kind, {}
    if not files.looks_like_file(name):
        bundled = ", ".join(CLASSIFICATION_DATA + INSTRUCTION_DATA)
        raise SystemExit(f"jlora: data {name!r} is neither a bundled set ({bundled}) nor a CSV / TSV / JSON / JSONL / "
                         "Parquet file")
    try:
        kind = args.kind or _file_kind(args, files.read_table(name).column_names)
        # as the train command: classification stratified by the label column, language modelling not at all
        stratify = (args.label_column or "label") if kind == "classification" else None
        splits = files.local_splits(name, args.validation_file, args.test_file, seed=args.seed, stratify=stratify)
    except (files.DataFileError, ValueError) as e:
        raise SystemExit(f"jlora: {e}") from None
    return dict(splits), kind, _columns(args, kind)


# --------------------------------------------------------------------------------------------
# tokenizer

def _gguf_tokenizer(path):
    import gguf


    reader = gguf.GGUFReader(str(path))
    return tokenizer_from_gguf(reader), reader


def tokenizer_for(model: str, kind: str, bundled: bool):
    """``(tokenizer, render, description)`` for ``--model``; no weights are read. ``render`` turns an
    instruction example into ``(prompt, supervised text)`` as the training task would render it
    (None: :func:`jlora.data.check.chatml`, the bundled SmolLM2's ChatML)."""
    from tokenizers import Tokenizer


    if model == "none":
        return None, None, "none (lengths in characters)"
    if model == "minilm":
        if kind == "instruction":
            raise SystemExit("jlora: --model minilm is an encoder for classification; instruction data is counted with "
                             "a decoder's tokenizer (smollm2, a Llama / Mistral / Qwen2 directory or a .gguf file)")
        return Tokenizer.from_file(str(assets.path("minilm", "model", "tokenizer.json"))), None, "minilm"

    try:
        family, path = resolve_model(model)
    except ModelError as e:
        raise SystemExit(f"jlora: --model {e}") from None
    if family == "vit":
        raise SystemExit(f"jlora: --model {model} is a ViT (images); data check reads text: give a text model or none")
    if (family == "bert") != (kind == "classification"):
        need = "an encoder (minilm, a BERT directory)" if kind == "classification" else \
            "a decoder (smollm2, a Llama / Mistral / Qwen2 directory or a .gguf file)"
        raise SystemExit(f"jlora: --model {model} is a {family} model; {kind} data trains {need}")
    if family == "bert":
        return Tokenizer.from_file(str(pathlib.Path(path) / "tokenizer.json")), None, model

    if path == "smollm2":
        path = str(assets.ensure("smollm2") / SMOLLM2_GGUF)
    if str(path).endswith(".gguf"):
        tok, reader = _gguf_tokenizer(path)
        fmt = TextFormat.from_gguf(reader, tok)
    else:
        tok = Tokenizer.from_file(str(pathlib.Path(path) / "tokenizer.json"))
        fmt = TextFormat.from_directory(path)
    if model == "smollm2" and bundled:
        return tok, None, "smollm2 (ChatML)"      # InstructionTask: tokenize_instructions(chat=True)
    if model == "smollm2" and fmt.chat_template is None:
        fmt = TextFormat(CHATML_JINJA, eos_token="<|im_end|>")
    return tok, _render_with(fmt), model + (" (its chat template)" if fmt.chat_template else " (no chat template)")


def _render_with(fmt):
    """``render(example) -> (prompt, supervised text)`` with a checkpoint's chat template, as
    :func:`jlora.data.chat.tokenize_conversations` / ``tokenize_pairs`` lay the rows out."""

    def render(example):
        if example.get("messages") is not None:
            msgs = example["messages"]
        elif fmt.chat_template is None:     # [bos] + prompt + response + [eos]
            return example["prompt"], example["response"] + (fmt.eos_token or "")
        else:
            msgs = [{"role": "user", "content": example["prompt"]}, {"role": "assistant", "content": example["response"]}]
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        try:
            prompt = fmt.render(msgs[:last], add_generation_prompt=True)
            full = fmt.render(msgs[:last + 1])
        except Exception as e:  # noqa: BLE001 - a template's own raise_exception / a jinja error
            raise SystemExit(f"jlora: the chat template cannot render an example: {e}") from None
        return prompt, full[len(prompt):] if full.startswith(prompt) else full

    return render


# --------------------------------------------------------------------------------------------
# output

def plot_lengths(result: dict, path) -> None:
    """The length histogram of every split (shared bins) as a PNG, with ``max_length`` marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lens = result["lengths"]
    edges = lens["histogram"]["edges"]
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, counts in lens["histogram"]["counts"].items():
        total = max(sum(counts), 1)
        ax.stairs([c / total for c in counts], edges, label=f"{name} ({sum(counts)})", linewidth=1.5)
    if lens["max_length"]:
        ax.axvline(lens["max_length"], color="k", linestyle="--", linewidth=1, label=f"max_length {lens['max_length']}")
    ax.set_xlabel(f"length ({lens['unit']})" + (f"; the last bin holds everything >= {edges[-2]}"
                                                if lens["histogram"].get("last_bin_open") else ""))
    ax.set_ylabel("fraction of the split")
    ax.set_title(f"{result.get('data', '')} lengths")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(args) -> int:
    """Runs ``jlora data check``; returns the exit status (1: ``--strict`` and an error was found)."""
    if getattr(args, "data_command", "check") != "check":
        raise SystemExit(f"jlora: unknown data command {args.data_command!r}; expected check")
    if not 0 < args.near_dup_threshold <= 1:
        raise SystemExit(f"jlora: --near-dup-threshold must be in (0, 1], got {args.near_dup_threshold}")
    if args.max_length is not None and args.max_length <= 0:
        raise SystemExit(f"jlora: --max-length must be a positive integer, got {args.max_length}")
    if args.examples < 0:
        raise SystemExit(f"jlora: --examples must be >= 0, got {args.examples}")
    if args.model == "none" and args.max_length is not None:
        raise SystemExit("jlora: --max-length counts tokens; it needs a tokenizer (--model other than none)")
    if args.out and pathlib.Path(args.out).is_file():
        raise SystemExit(f"jlora: --out {args.out} is a file, not a directory")
    splits, kind, columns = load(args)
    model = args.model or ("minilm" if kind == "classification" else "smollm2")
    tokenizer, render, described = tokenizer_for(model, kind, bundled=_bundled_kind(args.data) is not None)
    max_length = None if tokenizer is None else (args.max_length or DEFAULT_MAX_LENGTH)
    try:
        result = dcheck.check(splits, kind=kind, tokenizer=tokenizer, max_length=max_length, columns=columns,
                              near_dup_threshold=args.near_dup_threshold, examples_per_problem=args.examples,
                              render=render)
    except ValueError as e:
        flags = "--text-column / --label-column" if kind == "classification" else \
            "--messages-column / --prompt-column / --response-column / --text-column"
        hint = f"; name the columns with {flags}" if "column" in str(e) else ""
        raise SystemExit(f"jlora: data {args.data}: {e}{hint}") from None
    result = {"data": args.data, "model": described, **result}
    markdown = dcheck.report_markdown(result)
    if args.out:
        out = pathlib.Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "data_check.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
        (out / "data_check.md").write_text(markdown)
        plot_lengths(result, out / "token_lengths.png")
    print(json.dumps(result, indent=2, ensure_ascii=False) if args.json else markdown, end="" if not args.json else "\n")
    return 1 if args.strict and result["summary"]["error"] else 0


if __name__ == "__main__":   # python -m jlora.cli.data_check data check DATA ... (until wired into jlora's main)
    import sys

    _parser = argparse.ArgumentParser(prog="jlora")
    add_parser(_parser.add_subparsers(dest="command", required=True))
    sys.exit(main(_parser.parse_args()))
