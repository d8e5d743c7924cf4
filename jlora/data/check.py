"""A report on a data set before training: what would silently hurt a fine-tuning run.

:func:`check` looks at the splits a loader returns (``{"train": Dataset, "validation": ..., "test":
...}``, as :func:`jlora.data.rotten_tomatoes`, :func:`jlora.data.instruction_data` or
:func:`jlora.data.files.local_splits` give them) and finds, with counts and a few examples each
(split, row index, a short excerpt):

* **empty** examples: a used field (text, label, prompt, response, a message) blank or missing;
  **malformed** conversations (not a list of ``{role, content}``, no assistant turn);
* **over-long** examples: more tokens than ``max_length`` (they will be truncated; by how much);
  instruction rows whose prompt alone fills ``max_length`` (nothing left to learn from);
* **duplicates** within a split (after case / whitespace normalisation) and **conflicts**: the
  same input with different labels / responses;
* **leakage** across splits: the same input in two splits, and near-duplicates (Jaccard
  similarity of word 5-gram shingles >= ``near_dup_threshold``, found with MinHash + LSH banding
  in numpy and confirmed with the exact Jaccard);
* **label balance** (classification): counts per class per split, the max / min ratio, classes a
  split lacks;
* **template consistency** (instruction data): a per-example "shape signature" (fields present,
  the chat role sequence, leading markers such as ``### Instruction:`` / ``Question:`` or a
  special token, trailing whitespace) and its histogram; a second signature is a warning;
* **lengths**: a histogram and percentiles per split, in tokens with a tokenizer, else characters.

Every problem has a severity: ``"error"`` (fix before training: test examples that are also
training examples, empty examples), ``"warning"`` (worth a look: near-duplicates, imbalance,
mixed templates, truncation) or ``"info"``. The result is plain JSON (:func:`report_markdown`
renders it for people); ``jlora data check`` is the command line.

Example::

    from jlora import data
    from jlora.data.check import check, report_markdown
    result = check(data.rotten_tomatoes(), kind="classification")
    print(report_markdown(result))
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from jlora.data.text import _column

KINDS = ("classification", "instruction")
SEVERITIES = ("error", "warning", "info")
#: prompt / response column pairs recognised in a data file, in order of preference; the same as
#: ``jlora.cli.tasks_lm._PAIRS`` (repeated here so the check needs no model code; a test keeps them equal)
PAIRS = (("prompt", "response"), ("prompt", "completion"), ("instruction", "response"), ("instruction", "output"),
         ("question", "answer"), ("input", "output"))
ROLES = ("system", "user", "assistant", "tool")
SHINGLE = 5            # words per shingle
NUM_PERM = 128         # MinHash permutations
EXCERPT = 80           # characters of an example shown in a report
IMBALANCE_WARNING = 3.0


# --------------------------------------------------------------------------------------------
# columns

def detect_columns(column_names: Sequence[str], kind: str, columns: Mapping[str, str | None] | None = None) -> dict:
    """The columns the check (and the trainer) reads, as a dict of role -> column name.

    ``classification``: ``{"text", "label"}`` (defaults ``text`` / ``label``). ``instruction``: one of
    ``{"messages"}``, ``{"prompt", "input", "response"}`` (``input`` may be None) or ``{"text"}``,
    chosen as the CLI's training does (:class:`jlora.cli.tasks_lm.InstructionTask`): a ``messages``
    column, else the first of :data:`PAIRS` present, else ``text``. ``columns`` names them
    explicitly (keys as above; None values are detected). Raises ValueError naming the columns
    found when a needed one is missing.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    cols = list(column_names)
    given = {k: v for k, v in (columns or {}).items() if v}
    known = {"text", "label"} if kind == "classification" else {"text", "messages", "prompt", "input", "response"}
    unknown = sorted(set(given) - known)
    if unknown:
        raise ValueError(f"columns for {kind} data are {sorted(known)}; got {unknown}")

    def need(found: dict) -> dict:
        missing = [c for c in found.values() if c is not None and c not in cols]
        if missing:
            raise ValueError(f"no column {missing[0]!r}" + (f" (nor {missing[1:]})" if missing[1:] else "")
                             + f"; the columns are {cols}")
        return found

    if kind == "classification":
        return need({"text": given.get("text", "text"), "label": given.get("label", "label")})
    if "messages" in given or ("messages" in cols and not ({"prompt", "response", "text"} & set(given))):
        return need({"messages": given.get("messages", "messages")})
    if "prompt" in given or "response" in given:
        return need({"prompt": given.get("prompt", "prompt"), "input": given.get("input"),
                     "response": given.get("response", "response")})
    if "text" not in given:
        for p, r in PAIRS:
            if p in cols and r in cols:
                return need({"prompt": p, "input": "input" if p == "instruction" and "input" in cols else None,
                             "response": r})
    if "text" in given or "text" in cols:
        return need({"text": given.get("text", "text")})
    raise ValueError(f"found no columns to train a language model on; the columns are {cols}. Expected 'messages' "
                     f"(chat), a prompt / response pair ({', '.join('+'.join(p) for p in PAIRS)}) or 'text'")


# --------------------------------------------------------------------------------------------
# text helpers

def normalise(text: str) -> str:
    """The text compared for duplicates: NFKC, case-folded, whitespace runs made one space, stripped."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def _blank(value) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and not value.strip()


def _str(value) -> str:
    return "" if _blank(value) else str(value)


def excerpt(text: str, limit: int = EXCERPT) -> str:
    """The start of ``text`` on one line, cut to ``limit`` characters (``...`` marks a cut)."""
    one = " ".join(str(text).split())
    return one if len(one) <= limit else one[: limit - 3].rstrip() + "..."


_MARKER = re.compile(r"""^\s*(
      <\|[^|>\s]{1,40}\|>                                  # <|im_start|>, <|user|>, <|begin_of_text|>
    | <[A-Za-z_]{1,20}> | \[INST\]                          # <s>, <bos>, <start_of_turn>, [INST]
    | \#{1,6}[ \t]*[A-Za-z][A-Za-z \t]{0,30}:?              # ### Instruction:, ## Question
    | (?:instruction|input|question|q|definition|context|task|prompt|human|user|system|assistant|answer|a
       |response|output|text|sentence|passage|review|article|problem|query|premise|hypothesis|claim|title)s?[ \t]*:
    )""", re.IGNORECASE | re.VERBOSE)


def leading_marker(text: str) -> str:
    """A template marker at the start of ``text`` (``"### Instruction:"``, ``"Question:"``,
    ``"<|im_start|>"``, ...; whitespace collapsed, case kept) or ``""``."""
    m = _MARKER.match(text or "")
    return " ".join(m.group(1).split()) if m else ""


def _trailing(text: str) -> str:
    """The whitespace a text ends with, escaped (``"\\\\n"``, ``" "``), at most 4 characters."""
    tail = re.search(r"\s*$", text or "").group()
    return json.dumps(tail[-4:])[1:-1]


def _leading_ws(text: str) -> str:
    head = re.match(r"\s*", text or "").group()
    return json.dumps(head[:4])[1:-1]


# --------------------------------------------------------------------------------------------
# examples

def parse_messages(value) -> tuple[list[dict] | None, str | None]:
    """``(messages, None)`` for a valid conversation (a list, or its JSON, of ``{role, content}``
    with a known role and at least one assistant turn), else ``(None, why)``."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return None, f"not JSON: {excerpt(value, 40)!r}"
    if not isinstance(value, (list, tuple)) or not value:
        return None, f"not a non-empty list of messages: {excerpt(repr(value), 40)}"
    out = []
    for j, m in enumerate(value):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"),
                                                                                            (str, type(None))):
            return None, f"message {j} is not {{role: str, content: str}}"
        if m["role"] not in ROLES:
            return None, f"message {j} has role {m['role']!r}, not one of {ROLES}"
        out.append({"role": m["role"], "content": m.get("content") or ""})
    if not any(m["role"] == "assistant" for m in out):
        return None, "no assistant message"
    return out, None


def _role_pattern(roles: Sequence[str]) -> str:
    """A role sequence with alternating user / assistant turns folded: ``system,(user,assistant)+``."""
    s = ",".join(roles)
    return re.sub(r"user,assistant(,user,assistant)*", "(user,assistant)+", s)


class _Rows:
    """One split's examples in the form every check reads (parallel lists)."""

    def __init__(self, n: int):
        self.n = n
        self.key: list[str] = []         # normalised input: leakage, conflicts
        self.target: list[str | None] = []   # normalised label / response
        self.raw_key: list[str] = []     # the input as written (shingles, excerpts)
        self.target_raw: list[Any] = []  # label value / response as written
        self.empty: list[list[str]] = []     # blank fields of the row
        self.malformed: list[str | None] = []
        self.signature: list[str | None] = []
        self.prompt: list[str] = []      # token counting: prompt text (instruction) / the text
        self.response: list[str | None] = []   # supervised text (None: classification / plain text)
        self.chars: list[int] = []
        self.messages: list[list[dict] | None] = []


def _label_names(ds, column: str) -> list[str] | None:
    feature = ds.features.get(column) if hasattr(ds, "features") else None
    names = getattr(feature, "names", None)
    return list(names) if names else None


def _extract(ds, kind: str, cols: dict) -> _Rows:
    """Reads one split into :class:`_Rows` (no tokenising: that is batched later)."""
    n = len(ds)
    rows = _Rows(n)
    if kind == "classification":
        texts, labels = _column(ds, cols["text"]), _column(ds, cols["label"])
        names = _label_names(ds, cols["label"])
        for t, lab in zip(texts, labels):
            text = _str(t)
            empty = [f for f, v in (("text", t), ("label", lab)) if _blank(v)]
            value = None if _blank(lab) else (names[lab] if names and isinstance(lab, (int, np.integer)) else lab)
            rows.key.append(normalise(text))
            rows.raw_key.append(text)
            rows.target.append(None if value is None else repr(value) if not isinstance(value, str) else value)
            rows.target_raw.append(value)
            rows.empty.append(empty)
            rows.malformed.append(None)
            rows.signature.append(None)
            rows.prompt.append(text)
            rows.response.append(None)
            rows.chars.append(len(text))
            rows.messages.append(None)
        return rows
    if "messages" in cols:
        for value in _column(ds, cols["messages"]):
            msgs, why = parse_messages(value)
            rows.malformed.append(why)
            rows.messages.append(msgs)
            if msgs is None:
                rows.key.append("")
                rows.raw_key.append(excerpt(str(value), 200))
                rows.target.append(None)
                rows.target_raw.append(None)
                rows.empty.append([])
                rows.signature.append(None)
                rows.prompt.append("")
                rows.response.append("")
                rows.chars.append(0)
                continue
            last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
            context = msgs[:last]
            rows.key.append(normalise(json.dumps([[m["role"], normalise(m["content"])] for m in context])))
            rows.raw_key.append("\n".join(m["content"] for m in context if m["role"] != "system")
                                or msgs[last]["content"])
            rows.target.append(normalise(msgs[last]["content"]))
            rows.target_raw.append(msgs[last]["content"])
            rows.empty.append([f"message {j} ({m['role']})" for j, m in enumerate(msgs) if _blank(m["content"])])
            first_user = next((m["content"] for m in msgs if m["role"] == "user"), "")
            rows.signature.append(" | ".join([
                f"roles={_role_pattern([m['role'] for m in msgs])}",
                f"user starts={leading_marker(first_user)!r}",
                f"assistant starts={leading_marker(msgs[last]['content'])!r}",
                f"user ends={_trailing(first_user)!r}",
                f"assistant ends={_trailing(msgs[last]['content'])!r}"]))
            rows.prompt.append("")
            rows.response.append("")
            rows.chars.append(sum(len(m["content"]) for m in msgs))
        return rows
    if "text" in cols:
        for t in _column(ds, cols["text"]):
            text = _str(t)
            rows.key.append(normalise(text))
            rows.raw_key.append(text)
            rows.target.append(None)
            rows.target_raw.append(None)
            rows.empty.append(["text"] if _blank(t) else [])
            rows.malformed.append(None)
            rows.signature.append(f"text starts={leading_marker(text)!r} | text ends={_trailing(text)!r}")
            rows.prompt.append(text)
            rows.response.append(None)
            rows.chars.append(len(text))
            rows.messages.append(None)
        return rows
    prompts = _column(ds, cols["prompt"])
    inputs = _column(ds, cols["input"]) if cols.get("input") else [""] * n
    responses = _column(ds, cols["response"])
    for p, x, r in zip(prompts, inputs, responses):
        prompt, inp, resp = _str(p), _str(x), _str(r)
        full = prompt if not inp.strip() else f"{prompt}\n\n{inp}"
        rows.key.append(normalise(full))
        rows.raw_key.append(full)
        rows.target.append(normalise(resp) if not _blank(r) else None)
        rows.target_raw.append(resp)
        rows.empty.append([cols[f] for f, v in (("prompt", p), ("response", r)) if _blank(v)])
        rows.malformed.append(None)
        present = [cols[f] for f, v in (("prompt", p), ("input", x), ("response", r)) if cols.get(f) and not _blank(v)]
        parts = [f"fields={'+'.join(present)}", f"prompt starts={leading_marker(prompt)!r}"]
        if cols.get("input"):
            parts.append(f"input starts={leading_marker(inp)!r}" if inp.strip() else "input starts=-")
        parts += [f"response starts={leading_marker(resp)!r}", f"prompt ends={_trailing(prompt)!r}",
                  f"response ends={_trailing(resp)!r}", f"response leads={_leading_ws(resp)!r}"]
        rows.signature.append(" | ".join(parts))
        rows.prompt.append(full)
        rows.response.append(resp)
        rows.chars.append(len(full) + len(resp))
        rows.messages.append(None)
    return rows


# --------------------------------------------------------------------------------------------
# MinHash + LSH

def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, elementwise on uint64 (wrapping arithmetic)."""
    x = x.astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return x


def shingle_hashes(texts: Sequence[str], n: int = SHINGLE) -> tuple[np.ndarray, np.ndarray]:
    """Word ``n``-gram shingles of every text as 64-bit hashes: ``(hashes, counts)``, the hashes of
    text ``i`` being ``hashes[sum(counts[:i]) : sum(counts[:i + 1])]``.

    Words are ``\\w+`` runs of the :func:`normalise` d text (punctuation ignored). A text of fewer
    than ``n`` words is one shingle of all its words; an empty one has none. Deterministic (no
    Python ``hash``): the same text gives the same hashes in every process.
    """
    vocab: dict[str, int] = {}
    ids: list[int] = []
    lengths = np.zeros(len(texts), np.int64)
    for i, t in enumerate(texts):
        words = re.findall(r"\w+", normalise(t))
        lengths[i] = len(words)
        ids.extend(vocab.setdefault(w, len(vocab) + 1) for w in words)
    words = np.concatenate([np.asarray(ids, np.uint64), np.zeros(n, np.uint64)])
    counts = np.where(lengths > 0, np.maximum(lengths - n + 1, 1), 0)
    starts_of_text = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    total = int(counts.sum())
    text_of = np.repeat(np.arange(len(texts)), counts)
    offset = np.arange(total) - np.repeat(np.concatenate([[0], np.cumsum(counts)[:-1]]), counts)
    start = starts_of_text[text_of] + offset
    width = np.minimum(lengths[text_of], n)
    rng = np.random.default_rng(0x5EED)
    mult = rng.integers(1, 2 ** 63, size=n + 1, dtype=np.uint64) | np.uint64(1)
    h = np.zeros(total, np.uint64)
    with np.errstate(over="ignore"):
        for k in range(n):
            term = _mix64(words[start + k]) * mult[k]
            h += np.where(k < width, term, np.uint64(0))
        h += width.astype(np.uint64) * mult[n]
    return _mix64(h), counts


def _bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows): the most rows per band (fewest chance pairs) for which a pair of Jaccard
    ``threshold`` still becomes a candidate with probability >= 0.995."""
    best = (num_perm, 1)
    for r in range(1, num_perm + 1):
        if num_perm % r:
            continue
        b = num_perm // r
        if 1 - (1 - threshold ** r) ** b >= 0.995:
            best = (b, r)
    return best


def minhash(doc_of: np.ndarray, shingle: np.ndarray, n_docs: int, num_perm: int = NUM_PERM,
            seed: int = 0) -> np.ndarray:
    """MinHash signatures ``(n_docs, num_perm)`` (uint64) of the sets ``{shingle[i] : doc_of[i] = d}``.

    ``doc_of`` must be sorted and give every document at least one shingle; ``shingle`` are
    non-negative ids. Each id is first scrambled to 64 random-looking bits (:func:`_mix64`); hash
    ``k`` is then ``a_k * x + b_k`` modulo ``2 ** 64`` (``a_k`` odd: a bijection; the minimum is
    decided by the high bits, which depend on every bit of ``x``: multiply-shift hashing). (A plain
    ``(a * x + b) mod p`` over small ids never wraps, so it orders every document's shingles the same
    way for every ``k``: one hash, not ``num_perm``.)
    Work is done a block of permutations at a time so memory stays near 64 MB whatever the
    corpus size.
    """
    rng = np.random.default_rng(seed)
    a = rng.integers(1, 2 ** 63, size=num_perm, dtype=np.uint64) | np.uint64(1)
    b = rng.integers(0, 2 ** 63, size=num_perm, dtype=np.uint64)
    x = _mix64(shingle.astype(np.uint64))
    starts = np.flatnonzero(np.concatenate([[True], doc_of[1:] != doc_of[:-1]]))
    if len(starts) != n_docs:
        raise ValueError("minhash: every document needs at least one shingle")
    out = np.empty((n_docs, num_perm), np.uint64)
    step = max(1, (1 << 23) // max(len(x), 1))
    for k in range(0, num_perm, step):
        kk = slice(k, min(k + step, num_perm))
        with np.errstate(over="ignore"):
            values = x[:, None] * a[None, kk] + b[None, kk]
        out[:, kk] = np.minimum.reduceat(values, starts, axis=0)
    return out


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Exact Jaccard similarity of two sorted arrays of unique ids."""
    inter = len(np.intersect1d(a, b, assume_unique=True))
    union = len(a) + len(b) - inter
    return inter / union if union else 0.0


def near_duplicates(texts: Sequence[str], groups: Sequence[Any] | None = None, threshold: float = 0.9, *,
                    num_perm: int = NUM_PERM, seed: int = 0, common_fraction: float = 0.1,
                    max_bucket: int = 64) -> tuple[list[tuple[int, int, float]], dict]:
    """Pairs of ``texts`` whose word-5-gram Jaccard similarity is >= ``threshold``, with MinHash + LSH.

    Returns ``([(i, j, jaccard), ...], stats)`` with ``i < j``, each pair confirmed with the exact
    Jaccard of its shingle sets (so every pair returned is a true one; a true pair is missed with
    probability < 0.5 % by the banding, chosen by :func:`_bands`). With ``groups``, only pairs of
    different groups are looked for (e.g. the split of each text: leakage).

    Shingles found in more than ``common_fraction`` of the texts (and at least 3 of them) are
    template, not content (a task definition every row repeats, a fixed preamble) and are left out
    of both the signatures and the exact Jaccard; otherwise every pair of such rows would look
    alike. ``max_bucket`` bounds the pairs taken from one LSH bucket (each member is paired with
    the bucket's first ``max_bucket`` members) so a crowd of near-identical texts stays linear.
    """
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    n = len(texts)
    hashes, counts = shingle_hashes(texts)
    stats = {"texts": n, "shingles": int(len(hashes)), "common_shingles": 0, "candidates": 0, "bands": 0, "rows": 0}
    if n < 2 or len(hashes) == 0:
        return [], stats
    doc = np.repeat(np.arange(n, dtype=np.int64), counts)
    uniq, sid = np.unique(hashes, return_inverse=True)
    pair_key = np.unique(doc * len(uniq) + sid.reshape(-1))          # (doc, shingle) once each, sorted by doc
    doc, sid = pair_key // len(uniq), pair_key % len(uniq)
    df = np.bincount(sid, minlength=len(uniq))
    common = df >= max(3, math.ceil(common_fraction * n))
    stats["common_shingles"] = int(common.sum())
    keep = ~common[sid]
    doc, sid = doc[keep], sid[keep]
    docs = np.unique(doc)                           # texts with content shingles left
    if len(docs) < 2:
        return [], stats
    local = np.searchsorted(docs, doc)
    sig = minhash(local, sid, len(docs), num_perm, seed)
    bands, rows = _bands(threshold, num_perm)
    stats.update(bands=bands, rows=rows)
    group_of = None if groups is None else np.asarray([hash(g) for g in groups])[docs]
    rng = np.random.default_rng(seed + 1)
    mult = rng.integers(1, 2 ** 63, size=rows, dtype=np.uint64) | np.uint64(1)
    candidates: set[tuple[int, int]] = set()
    for band in range(bands):
        block = sig[:, band * rows:(band + 1) * rows]
        with np.errstate(over="ignore"):
            key = _mix64((_mix64(block) * mult[None, :]).sum(axis=1, dtype=np.uint64))
        order = np.argsort(key, kind="stable")
        sorted_key = key[order]
        same = sorted_key[1:] == sorted_key[:-1]
        if not same.any():
            continue
        starts = np.flatnonzero(np.concatenate([[True], ~same]))        # runs of one key
        sizes = np.diff(np.concatenate([starts, [len(order)]]))
        for s, size in zip(starts[sizes > 1], sizes[sizes > 1]):
            members = order[s:s + size]
            for pos, i in enumerate(members):
                for j in members[:min(pos, max_bucket)]:
                    if group_of is not None and group_of[i] == group_of[j]:
                        continue
                    candidates.add((min(i, j), max(i, j)))
    stats["candidates"] = len(candidates)
    bounds = np.concatenate([[0], np.cumsum(np.bincount(local, minlength=len(docs)))])
    sets = lambda d: sid[bounds[d]:bounds[d + 1]]  # noqa: E731 - sorted, unique per doc
    found = []
    for i, j in sorted(candidates):
        sim = jaccard(sets(i), sets(j))
        if sim >= threshold:
            found.append((int(docs[i]), int(docs[j]), sim))
    return found, stats


# --------------------------------------------------------------------------------------------
# the checks

def _problem(check: str, severity: str, message: str, count: int, examples: list, **extra) -> dict:
    return {"check": check, "severity": severity, "message": message, "count": int(count), **extra,
            "examples": examples}


def _example(split: str, row: int, text: str, **extra) -> dict:
    return {"split": split, "row": int(row), "excerpt": excerpt(text), **extra}


def _percentiles(values: np.ndarray) -> dict:
    if len(values) == 0:
        return {"count": 0}
    p = np.percentile(values, [50, 90, 99])
    return {"count": int(len(values)), "mean": round(float(values.mean()), 1), "p50": round(float(p[0]), 1),
            "p90": round(float(p[1]), 1), "p99": round(float(p[2]), 1), "max": int(values.max())}


def _histogram(lengths: Mapping[str, np.ndarray], max_length: int | None = None, bins: int = 30) -> dict:
    """Shared bin edges (round widths, from 0, up to the largest p99 or ``max_length``) and counts
    per split. Longer rows are counted in the last bin, which is then open (``"last_bin_open"``):
    one outlier of 5,000 tokens does not squash everything else into the first bin."""
    filled = [v for v in lengths.values() if len(v)]
    hi = max([float(np.percentile(v, 99)) for v in filled] + [max_length or 0, 1])
    raw = hi / bins
    magnitude = 10 ** math.floor(math.log10(raw)) if raw >= 1 else 1
    width = max(1, int(math.ceil(next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw))))
    edges = np.arange(0, (int(hi) // width + 2) * width, width)
    top = int(edges[-1]) - 1
    return {"edges": [int(e) for e in edges],
            "counts": {name: [int(c) for c in np.histogram(np.minimum(v, top), edges)[0]] for name, v in lengths.items()},
            "last_bin_open": any(int(v.max()) > top for v in filled)}


def _plain(tokenizer):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tokenizer.to_str())
    tok.no_padding()
    tok.no_truncation()
    return tok


def chatml(example: Mapping) -> tuple[str, str]:
    """The default rendering of an instruction example for counting tokens: ChatML, as the bundled
    SmolLM2 trains on it (:func:`jlora.data.instruct.tokenize_instructions` with ``chat=True``).
    Returns ``(prompt, supervised text)``; ``example`` has ``prompt`` + ``response`` (the prompt
    already joined with its input) or ``messages``."""
    if example.get("messages") is not None:
        msgs = example["messages"]
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        prompt = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in msgs[:last])
        return prompt + "<|im_start|>assistant\n", msgs[last]["content"] + "<|im_end|>"
    return (f"<|im_start|>user\n{example['prompt']}<|im_end|>\n<|im_start|>assistant\n",
            f"{example['response']}<|im_end|>")


def _token_lengths(rows: _Rows, kind: str, tokenizer, render) -> tuple[np.ndarray, np.ndarray | None]:
    """``(total tokens, prompt tokens or None)`` per row, as the trainer would see them."""
    tok = _plain(tokenizer)
    if kind == "classification" or all(r is None for r in rows.response) and not any(rows.messages):
        enc = tok.encode_batch(rows.prompt, add_special_tokens=True) if rows.n else []
        return np.asarray([len(e.ids) for e in enc], np.int64), None
    prompts, responses = [], []
    for i in range(rows.n):
        if rows.malformed[i] is not None:
            prompts.append("")
            responses.append("")
            continue
        ex = {"messages": rows.messages[i]} if rows.messages[i] is not None else \
            {"prompt": rows.prompt[i], "response": rows.response[i]}
        p, r = render(ex)
        prompts.append(p)
        responses.append(r)
    pe = tok.encode_batch(prompts, add_special_tokens=False) if rows.n else []
    re_ = tok.encode_batch(responses, add_special_tokens=False) if rows.n else []
    p_len = np.asarray([len(e.ids) for e in pe], np.int64)
    return p_len + np.asarray([len(e.ids) for e in re_], np.int64), p_len


def check(splits: Mapping[str, Any], *, kind: str, tokenizer=None, max_length: int | None = None,
          columns: Mapping[str, str | None] | None = None, near_dup_threshold: float = 0.9,
          examples_per_problem: int = 3, render: Callable[[Mapping], tuple[str, str]] | None = None) -> dict:
    """Checks ``splits`` (split name -> ``datasets.Dataset``) for what would hurt training; a JSON-able dict.

    ``kind`` is ``"classification"`` (text + label) or ``"instruction"`` (chat ``messages``, prompt /
    response pairs or plain ``text``); ``columns`` names the columns (see :func:`detect_columns`).
    With a ``tokenizer`` (a ``tokenizers.Tokenizer``) lengths are counted in tokens, as training
    would count them: classification texts with the tokenizer's special tokens, instruction
    examples rendered by ``render(example) -> (prompt, supervised text)`` (default :func:`chatml`),
    plain text with the special tokens; and with ``max_length`` the rows longer than it are
    reported. Without a tokenizer lengths are characters.

    Returns ``{"kind", "columns", "splits": {name: {"rows"}}, "unit", "max_length", "problems": [...],
    "label_balance", "templates", "lengths", "near_duplicates", "summary"}``; each problem is
    ``{"check", "severity", "message", "count", "split" | "splits", "examples": [{"split", "row",
    "excerpt", ...}]}`` with at most ``examples_per_problem`` examples, sorted errors first.
    """
    if not isinstance(splits, Mapping) or not splits:
        raise ValueError(f"splits must be a non-empty mapping of split name -> Dataset, got {type(splits).__name__}")
    if max_length is not None and (not isinstance(max_length, (int, np.integer)) or max_length <= 0):
        raise ValueError(f"max_length must be a positive integer, got {max_length!r}")
    if max_length is not None and tokenizer is None:
        raise ValueError("max_length is counted in tokens: give a tokenizer with it")
    if not 0 < near_dup_threshold <= 1:
        raise ValueError(f"near_dup_threshold must be in (0, 1], got {near_dup_threshold}")
    names = list(splits)
    first = splits[names[0]]
    cols = detect_columns(first.column_names, kind, columns)
    for name in names[1:]:
        missing = [c for c in cols.values() if c and c not in splits[name].column_names]
        if missing:
            raise ValueError(f"split {name!r} lacks the columns {missing}; its columns are {splits[name].column_names}")
    k = examples_per_problem
    rows = {name: _extract(splits[name], kind, cols) for name in names}
    problems: list[dict] = []

    # -- empty and malformed rows -------------------------------------------------------------
    for name, r in rows.items():
        bad = [(i, why) for i, why in enumerate(r.malformed) if why is not None]
        if bad:
            problems.append(_problem("malformed", "error", f"{len(bad)} {name} rows are not valid conversations "
                                     f"(a list of {{role, content}} with an assistant turn)", len(bad),
                                     [_example(name, i, r.raw_key[i], why=why) for i, why in bad[:k]], split=name))
        empty = [(i, f) for i, f in enumerate(r.empty) if f]
        if empty:
            fields = Counter(x for _, f in empty for x in f)
            problems.append(_problem(
                "empty", "error", f"{len(empty)} {name} rows have an empty or whitespace-only field "
                f"({', '.join(f'{f}: {c}' for f, c in fields.most_common())})", len(empty),
                [_example(name, i, r.raw_key[i] or str(r.target_raw[i] or ""), fields=f) for i, f in empty[:k]],
                split=name, fields=dict(fields)))

    # -- duplicates and conflicts within a split ------------------------------------------------
    conflict_severity = "warning" if kind == "classification" else "info"
    for name, r in rows.items():
        first_of: dict[tuple, int] = {}
        dups = []
        by_key: dict[str, list[int]] = defaultdict(list)
        for i in range(r.n):
            if r.malformed[i] is not None or not r.key[i]:
                continue
            full = (r.key[i], r.target[i])
            if full in first_of:
                dups.append((i, first_of[full]))
            else:
                first_of[full] = i
            if r.target[i] is not None:
                by_key[r.key[i]].append(i)
        if dups:
            groups = len({first for _, first in dups})
            problems.append(_problem(
                "duplicate", "warning", f"{len(dups)} {name} rows repeat an earlier {name} row ({groups} distinct "
                f"examples repeated; compared after case / whitespace normalisation)", len(dups),
                [_example(name, i, r.raw_key[i], duplicate_of=j) for i, j in dups[:k]], split=name, groups=groups))
        conflicts = []
        for key, members in by_key.items():
            targets = {r.target[i] for i in members}
            if len(targets) > 1:
                conflicts.append(members)
        if conflicts:
            what = "labels" if kind == "classification" else "responses"
            n_rows = sum(len(m) for m in conflicts)
            problems.append(_problem(
                "conflict", conflict_severity, f"{len(conflicts)} {name} inputs appear with different {what} "
                f"({n_rows} rows)", len(conflicts),
                [_example(name, m[0], r.raw_key[m[0]], rows=[int(i) for i in m[:10]],
                          targets=sorted({excerpt(str(r.target_raw[i]), 40) for i in m})[:5]) for m in conflicts[:k]],
                split=name, rows=n_rows))

    # -- leakage: exact ---------------------------------------------------------------------------
    where: dict[str, dict[str, int]] = defaultdict(dict)      # key -> {split: first row}
    for name, r in rows.items():
        for i in range(r.n):
            if r.malformed[i] is None and r.key[i]:
                where[r.key[i]].setdefault(name, i)
    pairs = [(a, b) for x, a in enumerate(names) for b in names[x + 1:]]
    for a, b in pairs:
        hits = []
        for i in range(rows[b].n):
            key = rows[b].key[i]
            if rows[b].malformed[i] is None and key and a in where.get(key, {}):
                hits.append((i, where[key][a]))
        if hits:
            severity = "error" if "train" in (a, b) else "warning"
            same = sum(rows[b].target[i] == rows[a].target[j] for i, j in hits)
            problems.append(_problem(
                "leakage", severity, f"{len(hits)} {b} rows have the same input as a {a} row "
                f"({same} of them with the same {'label' if kind == 'classification' else 'target'})", len(hits),
                [_example(b, i, rows[b].raw_key[i], other=_example(a, j, rows[a].raw_key[j])) for i, j in hits[:k]],
                splits=[a, b]))

    # -- leakage: near-duplicates -------------------------------------------------------------
    units, unit_split, unit_rows = [], [], []
    for name, r in rows.items():
        seen: dict[str, int] = {}
        for i in range(r.n):
            if r.malformed[i] is not None or not r.key[i]:
                continue
            if r.key[i] in seen:
                unit_rows[seen[r.key[i]]].append(i)
                continue
            seen[r.key[i]] = len(units)
            units.append(r.raw_key[i])
            unit_split.append(name)
            unit_rows.append([i])
    near_stats = {"threshold": near_dup_threshold, "pairs": 0}
    if len(names) > 1:
        found, stats = near_duplicates(units, unit_split, near_dup_threshold)
        near_stats.update(stats)
        by_pair: dict[tuple[str, str], dict[int, tuple[int, float]]] = defaultdict(dict)
        for u, v, sim in found:
            if rows[unit_split[u]].key[unit_rows[u][0]] == rows[unit_split[v]].key[unit_rows[v][0]]:
                continue
            if names.index(unit_split[u]) > names.index(unit_split[v]):
                u, v = v, u
            pair = (unit_split[u], unit_split[v])
            best = by_pair[pair].get(v)
            if best is None or sim > best[1]:
                by_pair[pair][v] = (u, sim)
        near_stats["pairs"] = len(found)
        for a, b in pairs:
            hits = by_pair.get((a, b))
            if not hits:
                continue
            # rows of b with a near-duplicate in a, minus those already exact leaks
            leaked = [(v, u, sim) for v, (u, sim) in sorted(hits.items()) if a not in where[rows[b].key[unit_rows[v][0]]]]
            if not leaked:
                continue
            count = sum(len(unit_rows[v]) for v, _, _ in leaked)
            problems.append(_problem(
                "near_duplicate", "warning", f"{count} {b} rows are near-duplicates of {a} rows (word 5-gram "
                f"Jaccard >= {near_dup_threshold})", count,
                [_example(b, unit_rows[v][0], units[v], similarity=round(sim, 3),
                          other=_example(a, unit_rows[u][0], units[u])) for v, u, sim in leaked[:k]],
                splits=[a, b]))

    # -- label balance ----------------------------------------------------------------------------
    balance = None
    if kind == "classification":
        declared = _label_names(first, cols["label"])
        counts = {name: Counter(str(v) for v in r.target_raw if v is not None) for name, r in rows.items()}
        classes = list(declared) if declared else sorted({c for cnt in counts.values() for c in cnt})
        classes += sorted({c for cnt in counts.values() for c in cnt} - set(classes))
        balance = {"classes": classes, "splits": {}}
        for name in names:
            cnt = counts[name]
            present = [cnt[c] for c in classes if cnt[c]]
            ratio = (max(present) / min(present)) if present else None
            missing = [c for c in classes if not cnt[c]]
            balance["splits"][name] = {"counts": {c: int(cnt[c]) for c in classes},
                                       "imbalance": round(ratio, 2) if ratio else None, "missing": missing}
            if len(present) == 1 and name == "train":
                problems.append(_problem("label_balance", "error", f"{name} has a single class "
                                         f"({next(c for c in classes if cnt[c])!r}); nothing to tell apart", 1, [],
                                         split=name))
            if missing and rows[name].n:
                severity = "error" if name == "train" else "warning"
                problems.append(_problem("missing_class", severity, f"{name} has no example of "
                                         f"{len(missing)} class(es): {missing[:10]}", len(missing), [], split=name,
                                         classes=missing))
            if ratio and ratio > IMBALANCE_WARNING:
                top = max(classes, key=lambda c: cnt[c])
                low = min((c for c in classes if cnt[c]), key=lambda c: cnt[c])
                problems.append(_problem("imbalance", "warning", f"{name} labels are imbalanced: {top!r} has "
                                         f"{cnt[top]} rows, {low!r} {cnt[low]} (ratio {ratio:.1f} > "
                                         f"{IMBALANCE_WARNING:g})", 1, [], split=name, ratio=round(ratio, 2)))

    # -- template consistency -------------------------------------------------------------------
    templates = None
    if kind == "instruction":
        hist: Counter = Counter()
        members: dict[str, list[tuple[str, int]]] = defaultdict(list)
        for name, r in rows.items():
            for i, s in enumerate(r.signature):
                if s is not None:
                    hist[s] += 1
                    if len(members[s]) < k:
                        members[s].append((name, i))
        templates = {"signatures": [{"signature": s, "count": c} for s, c in hist.most_common()]}
        if len(hist) > 1:
            major, major_count = hist.most_common(1)[0]
            minority = [(s, c) for s, c in hist.most_common()[1:]]
            rest = sum(c for _, c in minority)
            problems.append(_problem(
                "mixed_templates", "warning", f"{len(hist)} example formats: {rest} rows differ from the most common "
                f"({major_count} rows: {major})", rest,
                [_example(n_, i, rows[n_].raw_key[i], signature=s) for s, _ in minority for n_, i in members[s]][:k],
                signatures=len(hist)))

    # -- lengths and truncation -------------------------------------------------------------------
    unit = "tokens" if tokenizer is not None else "characters"
    lengths, prompt_lengths = {}, {}
    for name, r in rows.items():
        if tokenizer is not None:
            lengths[name], prompt_lengths[name] = _token_lengths(r, kind, tokenizer, render or chatml)
        else:
            lengths[name], prompt_lengths[name] = np.asarray(r.chars, np.int64), None
        valid = np.asarray([m is None for m in r.malformed], bool)
        lengths[name] = lengths[name][valid] if len(lengths[name]) else lengths[name]
        if prompt_lengths[name] is not None:
            prompt_lengths[name] = prompt_lengths[name][valid]
        index = np.flatnonzero(valid)
        if max_length is None:
            continue
        over = np.flatnonzero(lengths[name] > max_length)
        if len(over):
            excess = lengths[name][over] - max_length
            lost = float(excess.sum()) / max(float(lengths[name].sum()), 1.0)
            problems.append(_problem(
                "too_long", "warning", f"{len(over)} {name} rows ({100 * len(over) / max(len(lengths[name]), 1):.1f} %) "
                f"are longer than max_length={max_length} and will be truncated (by {int(excess.max())} tokens at most, "
                f"{excess.mean():.1f} on average; {100 * lost:.1f} % of the split's tokens are cut)", len(over),
                [_example(name, index[i], r.raw_key[index[i]], tokens=int(lengths[name][i]))
                 for i in over[np.argsort(-lengths[name][over], kind="stable")][:k]],
                split=name, max_excess=int(excess.max()), mean_excess=round(float(excess.mean()), 1),
                fraction_tokens_cut=round(lost, 4)))
        if prompt_lengths[name] is not None:
            full = np.flatnonzero(prompt_lengths[name] >= max_length)
            if len(full):
                problems.append(_problem(
                    "prompt_too_long", "warning", f"{len(full)} {name} rows have a prompt of >= max_length="
                    f"{max_length} tokens: truncation leaves them no response token to learn from", len(full),
                    [_example(name, index[i], r.raw_key[index[i]], prompt_tokens=int(prompt_lengths[name][i]))
                     for i in full[:k]], split=name))
    length_report = {"unit": unit, "max_length": max_length,
                     "splits": {name: _percentiles(v) for name, v in lengths.items()},
                     "histogram": _histogram(lengths, max_length)}

    order = {s: i for i, s in enumerate(SEVERITIES)}
    problems.sort(key=lambda p: order[p["severity"]])
    summary = {s: sum(p["severity"] == s for p in problems) for s in SEVERITIES}
    return {"kind": kind, "columns": cols, "splits": {name: {"rows": rows[name].n} for name in names},
            "unit": unit, "max_length": max_length, "problems": problems, "label_balance": balance,
            "templates": templates, "lengths": length_report, "near_duplicates": near_stats, "summary": summary}


def report_markdown(result: Mapping) -> str:
    """A :func:`check` result as Markdown: the problems (errors first) with examples, label balance,
    template signatures and length percentiles."""
    out = []
    s = result["summary"]
    sizes = ", ".join(f"{name} {v['rows']}" for name, v in result["splits"].items())
    out.append(f"# Data check: {result.get('data', result['kind'])}\n")
    out.append(f"{result['kind']} data, columns {json.dumps(result['columns'])}; rows: {sizes}.\n")
    out.append(f"**{s['error']} error(s), {s['warning']} warning(s), {s['info']} note(s).**\n")
    if result["problems"]:
        out.append("## Problems\n")
        for p in result["problems"]:
            where = p.get("split") or " / ".join(p.get("splits", [])) or "all splits"
            out.append(f"- **{p['severity']}** `{p['check']}` ({where}): {p['message']}")
            for e in p["examples"]:
                line = f"  - {e['split']} row {e['row']}: {e['excerpt']!r}"
                if "other" in e:
                    o = e["other"]
                    line += f" ~ {o['split']} row {o['row']}: {o['excerpt']!r}"
                for extra in ("similarity", "duplicate_of", "targets", "fields", "why", "tokens", "prompt_tokens",
                              "signature"):
                    if extra in e:
                        line += f"; {extra.replace('_', ' ')}: {e[extra]}"
                out.append(line)
        out.append("")
    else:
        out.append("No problems found.\n")
    bal = result.get("label_balance")
    if bal:
        out.append("## Labels\n")
        names = list(bal["splits"])
        out.append("| class | " + " | ".join(names) + " |")
        out.append("|---|" + "---:|" * len(names))
        for c in bal["classes"]:
            out.append(f"| {c} | " + " | ".join(str(bal["splits"][n]["counts"][c]) for n in names) + " |")
        out.append("| max / min | " + " | ".join(str(bal["splits"][n]["imbalance"]) for n in names) + " |\n")
    tpl = result.get("templates")
    if tpl:
        out.append("## Example formats\n")
        out.append("| rows | signature |")
        out.append("|---:|---|")
        for t in tpl["signatures"][:10]:
            out.append(f"| {t['count']} | `{t['signature']}` |")
        if len(tpl["signatures"]) > 10:
            out.append(f"| ... | {len(tpl['signatures']) - 10} more |")
        out.append("")
    lens = result["lengths"]
    out.append(f"## Lengths ({lens['unit']}" + (f", max_length {lens['max_length']}" if lens["max_length"] else "")
               + ")\n")
    out.append("| split | rows | mean | p50 | p90 | p99 | max |")
    out.append("|---|---:|---:|---:|---:|---:|---:|")
    for name, v in lens["splits"].items():
        if v.get("count"):
            out.append(f"| {name} | {v['count']} | {v['mean']} | {v['p50']:g} | {v['p90']:g} | {v['p99']:g} | {v['max']} |")
        else:
            out.append(f"| {name} | 0 | | | | | |")
    return "\n".join(out) + "\n"
