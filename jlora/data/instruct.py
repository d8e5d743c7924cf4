"""Instruction-tuning data (ChatterBot, BIG-bench natural_instructions) and prompt tokenisation.

* ChatterBot's English YAML conversations come from the ``chatterbot-corpus`` wheel.
* BIG-bench tasks are read from the ``bigbench==1.0.0`` **source archive** (358 MB), fetched once by
  :func:`jlora.assets.download_sdist` and never installed (its requirements pull in TensorFlow).
  Only the wanted ``task.json`` members are streamed out with :mod:`tarfile`, one pass over the
  archive, and cached as plain files under ``jlora.assets.cache_dir()/bigbench/<task>/[<sub>/]``.

Labels follow the usual causal-LM convention: ``labels`` is aligned with ``input_ids`` (the loss
shifts by one), and :data:`IGNORE_INDEX` (``-100``) marks prompt and padding positions.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import difflib  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import re  # noqa: E402
import tarfile  # noqa: E402
import tempfile  # noqa: E402
from collections.abc import Iterable, Mapping, Sequence  # noqa: E402
from typing import Any  # noqa: E402

import datasets  # noqa: E402
import numpy as np  # noqa: E402

from jlora import assets  # noqa: E402
from jlora.data.text import SPLIT_NAMES, _column, _pad_id, split_indices, split_key  # noqa: E402

IGNORE_INDEX = -100
INSTRUCTION_TEMPLATE = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
_INPUT_BLOCK = "### Input:\n{input}\n\n"       # removed from a template when the input is empty
CHATML_TEMPLATE = "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
CHATML_END = "<|im_end|>"

BIGBENCH = ("bigbench", "1.0.0")
_FEATURES = datasets.Features({k: datasets.Value("string") for k in ("instruction", "input", "response", "category")})


# --------------------------------------------------------------------------------------------
# ChatterBot

def chatterbot_conversations(dedupe: bool = True) -> datasets.Dataset:
    """(question, answer) pairs from ``chatterbot_corpus/data/english/*.yml``.

    Every conversation ``[u0, u1, u2, ...]`` gives the consecutive pairs ``(u0, u1), (u1, u2), ...``
    (each utterance answers the one before it). Columns: ``instruction`` (the question), ``input``
    (always ``""``), ``response``, ``category`` (the YAML file's stem, e.g. ``"ai"``). Empty
    utterances are dropped, and with ``dedupe`` (the default) so are exact repeats of a
    (question, answer) pair: chatterbot-corpus 1.3.3 gives 2,306 pairs, but ``tech_support.yml``
    repeats the same 10 pairs 105 times, so only 1,176 are distinct. One malformed conversation
    (a bare string in ``trivia.yml``) is skipped. Files are read in sorted order, so the row
    order is fixed.
    """
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)      # safe loading; libyaml when present
    root = assets.path("chatterbot_corpus", "data", "english")
    rows, seen = [], set()
    for f in sorted(root.glob("*.yml")):
        doc = yaml.load(f.read_text(encoding="utf-8"), Loader=loader) or {}
        for conv in doc.get("conversations") or []:
            if not isinstance(conv, list):       # trivia.yml #13 is a bare string (malformed YAML)
                continue
            turns = [str(t).strip() for t in conv if t is not None]
            for q, a in zip(turns, turns[1:]):
                if q and a and not (dedupe and (q, a) in seen):
                    seen.add((q, a))
                    rows.append({"instruction": q, "input": "", "response": a, "category": f.stem})
    return datasets.Dataset.from_list(rows, features=_FEATURES)


# --------------------------------------------------------------------------------------------
# BIG-bench

_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")


def _check_name(name: str, what: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name) or name in (".", ".."):
        raise ValueError(f"invalid BIG-bench {what} name {name!r}")
    return name


def _member_rel(name: str) -> str | None:
    """``<task>/[<sub>/]task.json`` for a ``.../benchmark_tasks/...`` archive member, else None."""
    if "benchmark_tasks/" not in name or not name.endswith("/task.json"):
        return None
    rel = name.split("benchmark_tasks/", 1)[1]
    parts = rel.split("/")
    if not 2 <= len(parts) <= 3 or not all(_NAME.match(p) for p in parts):
        return None
    return rel


def _cache_root(cache_dir) -> pathlib.Path:
    root = pathlib.Path(cache_dir) if cache_dir is not None else assets.cache_dir() / "bigbench"
    root.mkdir(parents=True, exist_ok=True)
    return root


def _default_archive_name() -> str:
    return f"{BIGBENCH[0]}-{BIGBENCH[1]}.tar.gz"


def _index_path(root: pathlib.Path, archive_name: str) -> pathlib.Path:
    return root / f"index-{archive_name}.json"


def _read_index(root: pathlib.Path, archive_name: str, archive: pathlib.Path | None = None) -> list[str] | None:
    """The cached list of task files of an archive (checked against its size when it is at hand)."""
    try:
        data = json.loads(_index_path(root, archive_name).read_text())
        if archive is not None and archive.exists() and data.get("size") != archive.stat().st_size:
            return None
        return list(data["members"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _atomic_write(path: pathlib.Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


def _extract(archive: pathlib.Path, root: pathlib.Path, wanted) -> list[str]:
    """One streaming pass: caches every ``task.json`` whose rel path satisfies ``wanted(rel)``;
    records the list of all task files (the index). Returns the rel paths it extracted."""
    got, members = [], []
    with tarfile.open(archive, mode="r:*") as tar:
        for m in tar:
            rel = _member_rel(m.name) if m.isfile() else None
            if rel is None:
                continue
            members.append(rel)
            if wanted(rel):
                f = tar.extractfile(m)
                if f is not None:
                    _atomic_write(root / rel, f.read())
                    got.append(rel)
    _atomic_write(_index_path(root, archive.name),
                  json.dumps({"size": archive.stat().st_size, "members": sorted(members)}).encode())
    return got


def bigbench_extract(rels: Iterable[str], *, archive=None, cache_dir=None) -> list[pathlib.Path]:
    """Caches several ``<task>/[<sub>/]task.json`` files in one pass (about 11 s over the real
    archive); already cached ones are skipped. Returns their cached paths."""
    root = _cache_root(cache_dir)
    rels = [r for r in rels]
    for r in rels:
        if _member_rel("benchmark_tasks/" + r) != r:
            raise ValueError(f"not a BIG-bench task path: {r!r}")
    missing = {r for r in rels if not (root / r).is_file()}
    if missing:
        arch = pathlib.Path(archive) if archive is not None else assets.download_sdist(*BIGBENCH)
        _extract(arch, root, lambda rel: rel in missing)
        absent = [r for r in missing if not (root / r).is_file()]
        if absent:
            raise FileNotFoundError(f"{sorted(absent)} not in {arch}")
    return [root / r for r in rels]


def bigbench_task(task_name: str, subtask: str | None = None, *, archive=None, cache_dir=None) -> dict:
    """The parsed ``task.json`` of BIG-bench task ``task_name`` (or its ``subtask``).

    Looks in the cache first (``jlora.assets.cache_dir()/bigbench``, or ``cache_dir``); on a miss it
    streams the sdist ``archive`` (default: ``jlora.assets.download_sdist("bigbench", "1.0.0")``,
    which downloads 358 MB once) and caches the file. ``subtask`` may be a unique prefix, e.g.
    ``"subtask047"``. Returns the JSON dict (``examples``, ``task_prefix``, ``name``, ...).
    """
    _check_name(task_name, "task")
    if subtask is not None:
        _check_name(subtask, "subtask")
    root = _cache_root(cache_dir)
    exact = f"{task_name}/{subtask}/task.json" if subtask else f"{task_name}/task.json"

    def load(rel: str) -> dict:
        return json.loads((root / rel).read_text(encoding="utf-8"))

    if (root / exact).is_file():
        return load(exact)
    prefix = f"{task_name}/{subtask}" if subtask else None
    what = prefix or task_name

    def matches(rel: str) -> bool:
        return rel == exact or (prefix is not None and rel.startswith(prefix) and rel.count("/") == 2)

    def resolve(index: list[str], source: str) -> str:
        found = sorted(r for r in index if matches(r))
        if exact in found:
            return exact
        if len(found) == 1:
            return found[0]
        if found:
            raise ValueError(f"BIG-bench subtask {what!r} is ambiguous: {[r.rsplit('/', 1)[0] for r in found]}")
        names = sorted({r.rsplit("/", 1)[0] for r in index})
        close = difflib.get_close_matches(what, names, n=5, cutoff=0.5)
        raise KeyError(f"no BIG-bench task {what!r} in {source}" + (f"; close: {close}" if close else ""))

    name = pathlib.Path(archive).name if archive is not None else _default_archive_name()
    index = _read_index(root, name, pathlib.Path(archive) if archive is not None else assets.cache_dir() / name)
    if index is not None:                  # known archive: resolve (and fail fast) before any scan
        rel = resolve(index, name)
        if (root / rel).is_file():
            return load(rel)
    arch = pathlib.Path(archive) if archive is not None else assets.download_sdist(*BIGBENCH)
    taken: list[str] = []

    def wanted(rel: str) -> bool:          # the exact file, else the first prefix match only
        if rel == exact or (matches(rel) and not taken):
            taken.append(rel)
            return True
        return False

    _extract(arch, root, wanted)
    return load(resolve(_read_index(root, arch.name) or [], arch.name))


def _first_target(target: Any) -> str | None:
    if isinstance(target, str):
        return target
    if isinstance(target, (list, tuple)) and target and isinstance(target[0], str):
        return target[0]
    return None


def natural_instructions(subtask: str, *, archive=None, cache_dir=None) -> datasets.Dataset:
    """One BIG-bench ``natural_instructions`` subtask as ``{instruction, input, response, category}``.

    ``instruction`` is the task's ``task_prefix`` (definition, things to avoid, prompt), ``input``
    the example input, ``response`` the first acceptable ``target``, ``category`` the subtask's full
    name. Examples without a string target are skipped.
    """
    task = bigbench_task("natural_instructions", subtask, archive=archive, cache_dir=cache_dir)
    instruction = (task.get("task_prefix") or task.get("description") or "").strip()
    name = task.get("name") or subtask
    rows = []
    for ex in task.get("examples", []):
        resp = _first_target(ex.get("target"))
        if resp is None:
            continue
        rows.append({"instruction": instruction, "input": str(ex.get("input", "")).strip(),
                     "response": resp.strip(), "category": name})
    return datasets.Dataset.from_list(rows, features=_FEATURES)


def instruction_data(source: str = "chatterbot", seed: int = 0, splits: Sequence[float] = (0.8, 0.1, 0.1), *,
                     archive=None, cache_dir=None) -> datasets.DatasetDict:
    """Instruction pairs as a seeded train/validation/test ``DatasetDict``.

    ``source`` is ``"chatterbot"`` or ``"natural_instructions:<subtask>"`` (a unique prefix such as
    ``"natural_instructions:subtask047"`` works). Splits are stratified by ``category`` and grouped
    by prompt (instruction + input, up to case, whitespace and a trailing ``.?!``: :func:`~jlora.data.text.split_key`):
    a question with several answers, or asked twice in other case, never straddles two splits.
    ``test`` is for reporting only; select on ``validation``.
    """
    if source == "chatterbot":
        ds = chatterbot_conversations()
    elif source.startswith("natural_instructions:"):
        ds = natural_instructions(source.split(":", 1)[1], archive=archive, cache_dir=cache_dir)
    else:
        raise ValueError(f"unknown instruction source {source!r}; use 'chatterbot' or "
                         "'natural_instructions:<subtask>'")
    groups = [f"{split_key(i)}\x00{split_key(x)}" for i, x in zip(_column(ds, "instruction"), _column(ds, "input"))]
    idx = split_indices(_column(ds, "category"), seed=seed, splits=splits, groups=groups)
    return datasets.DatasetDict({name: ds.select(i) for name, i in zip(SPLIT_NAMES, idx)})


# --------------------------------------------------------------------------------------------
# prompts and tokenisation

def format_prompt(instruction: str, input: str = "", template: str = INSTRUCTION_TEMPLATE) -> str:
    """``template`` filled in; its ``### Input:`` block is dropped when ``input`` is blank."""
    if not (input or "").strip():
        template = template.replace(_INPUT_BLOCK, "")
    return template.format(instruction=instruction, input=input)


def chat_prompt(instruction: str, input: str = "") -> str:
    """The ChatML prefix up to the assistant turn; the user message is instruction + blank line + input."""
    user = instruction if not (input or "").strip() else f"{instruction}\n\n{input}"
    return CHATML_TEMPLATE.format(prompt=user)


def _token_id(tokenizer, token, what: str) -> int | None:
    if token is None:
        return None
    if isinstance(token, (int, np.integer)):
        return int(token)
    i = tokenizer.token_to_id(token)
    if i is None:
        raise ValueError(f"{what} {token!r} is not in the tokenizer's vocabulary")
    return int(i)


def tokenize_instructions(dataset, tokenizer, max_length: int, template: str = INSTRUCTION_TEMPLATE,
                          eos_token: str | int | None = None, chat: bool = False, *,
                          bos_token: str | int | None = None,
                          pad_id: int | None = None) -> dict[str, np.ndarray]:
    """Tokenises ``{instruction, input, response}`` rows for supervised fine-tuning of a causal LM.

    The prompt is :func:`format_prompt` with ``template`` (or, with ``chat=True``, the ChatML turn of
    :func:`chat_prompt`, the response then being followed by ``<|im_end|>``). Prompt and response are
    tokenised separately without the tokenizer's own special tokens, so their boundary is exact:
    ``ids = [bos] + prompt + response + [eos]``. ``eos_token`` (a token or an id) is appended when
    given (in chat mode unless it is ``<|im_end|>`` itself). If longer than ``max_length`` the
    sequence keeps its start: the response end goes first, and a prompt that alone exceeds
    ``max_length`` leaves a row with no supervised token (all labels ignored).

    ``dataset`` is a ``datasets.Dataset``, a dict of columns, or a list of row dicts with keys
    ``instruction``, ``response`` and optionally ``input``.

    Returns int32 arrays of shape ``(n, max_length)``: ``input_ids`` (padded with ``pad_id``, by
    default the tokenizer's pad id or 0), ``attention_mask``, and ``labels`` equal to ``input_ids`` on
    response (+ eos) tokens and :data:`IGNORE_INDEX` on prompt and padding. ``tokenizer`` is a
    ``tokenizers.Tokenizer`` and is not modified.
    """
    from tokenizers import Tokenizer

    if max_length <= 0:
        raise ValueError(f"max_length must be positive, got {max_length}")
    tok = Tokenizer.from_str(tokenizer.to_str())
    tok.no_padding()
    tok.no_truncation()
    pid = _pad_id(tokenizer, pad_id)
    eos_id = _token_id(tok, eos_token, "eos_token")
    bos_id = _token_id(tok, bos_token, "bos_token")
    if chat and eos_token is not None and eos_token == CHATML_END:
        eos_id = None                                   # <|im_end|> already closes the response

    if isinstance(dataset, Mapping) or hasattr(dataset, "column_names"):      # columns (dict / Dataset)
        cols = dataset
        instrs, resps = _column(cols, "instruction"), _column(cols, "response")
        has_input = "input" in (cols.column_names if hasattr(cols, "column_names") else cols)
        inputs = _column(cols, "input") if has_input else [""] * len(instrs)
    else:                                                                      # a sequence of row dicts
        rows = list(dataset)
        instrs = [r["instruction"] for r in rows]
        inputs = [r.get("input", "") for r in rows]
        resps = [r["response"] for r in rows]
    prompts, responses = [], []
    for instr, inp, resp in zip(instrs, inputs, resps):
        if chat:
            prompts.append(chat_prompt(instr, inp or ""))
            responses.append(resp + CHATML_END)
        else:
            prompts.append(format_prompt(instr, inp or "", template))
            responses.append(resp)
    n = len(prompts)
    p_enc = tok.encode_batch(prompts, add_special_tokens=False) if n else []
    r_enc = tok.encode_batch(responses, add_special_tokens=False) if n else []
    input_ids = np.full((n, max_length), pid, dtype=np.int32)
    attention = np.zeros((n, max_length), dtype=np.int32)
    labels = np.full((n, max_length), IGNORE_INDEX, dtype=np.int32)
    for i, (pe, re_) in enumerate(zip(p_enc, r_enc)):
        p = ([bos_id] if bos_id is not None else []) + list(pe.ids)
        r = list(re_.ids) + ([eos_id] if eos_id is not None else [])
        ids = (p + r)[:max_length]
        k = min(len(p), max_length)
        input_ids[i, :len(ids)] = ids
        attention[i, :len(ids)] = 1
        labels[i, k:len(ids)] = ids[k:]
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}
