"""Your own data: CSV / TSV / JSON / JSONL / Parquet files read with ``datasets``, seeded splits,
label sets read from the data, and clear errors naming the columns a file really has.

:func:`read_table` reads one file; :func:`local_splits` makes ``train`` / ``validation`` / ``test``
from a training file and, when given, separate validation and test files (otherwise a seeded
split, stratified by ``stratify`` when that column exists). :func:`encode_labels` turns a label
column (strings or integers) into class ids with the names sorted, the same on every split.

Nothing here talks to a hub: ``datasets`` runs with ``HF_DATASETS_OFFLINE=1`` and reads only the
paths given.

Example::

    splits = local_splits("reviews.csv", seed=0, stratify="label")
    names, splits = encode_labels(splits, "label")
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pathlib  # noqa: E402
from collections.abc import Sequence  # noqa: E402

import datasets  # noqa: E402
import numpy as np  # noqa: E402

from jlora.data.text import SPLIT_NAMES, _column, split_indices  # noqa: E402

#: file suffix -> (``datasets`` builder, extra builder options)
FORMATS = {".csv": ("csv", {}), ".tsv": ("csv", {"sep": "\t"}), ".json": ("json", {}), ".jsonl": ("json", {}),
           ".parquet": ("parquet", {})}
_COMPRESSED = (".gz", ".bz2", ".xz", ".zst")


class DataFileError(ValueError):
    """A data file that cannot be used: missing, of an unknown format, empty, or without the
    columns asked for (the message lists the columns it has)."""


def table_format(path) -> tuple[str, dict]:
    """The ``datasets`` builder and options for a file name (``reviews.csv``, ``chat.jsonl.gz``)."""
    name = pathlib.Path(path).name.lower()
    for comp in _COMPRESSED:
        if name.endswith(comp):
            name = name[: -len(comp)]
    suffix = pathlib.Path(name).suffix
    if suffix not in FORMATS:
        raise DataFileError(f"data file {path}: unknown format {suffix or '(no suffix)'!r}; expected one of "
                            f"{sorted(FORMATS)} (optionally compressed: {', '.join(_COMPRESSED)})")
    return FORMATS[suffix]


def looks_like_file(name: str) -> bool:
    """Whether a ``--data`` value names a file rather than a bundled data set."""
    try:
        table_format(name)
        return True
    except DataFileError:
        return os.sep in name or pathlib.Path(name).is_file()


def read_table(path) -> datasets.Dataset:
    """One data file as a ``datasets.Dataset`` (every row; column types inferred by ``datasets``).

    Raises :class:`DataFileError` for a missing or empty file, an unknown suffix, or a file the
    reader rejects (the reader's message is kept).
    """
    path = pathlib.Path(path)
    builder, options = table_format(path)
    if not path.is_file():
        raise DataFileError(f"data file {path} does not exist")
    if path.stat().st_size == 0:
        raise DataFileError(f"data file {path} is empty")
    bars = datasets.utils.logging.is_progress_bar_enabled()
    datasets.utils.logging.disable_progress_bar()
    try:
        ds = datasets.load_dataset(builder, data_files={"train": str(path.resolve())}, split="train", **options)
    except Exception as e:  # noqa: BLE001 - pyarrow / pandas parse errors come in many types
        if "corresponds to no data" in str(e):   # a header and nothing else
            raise DataFileError(f"data file {path} has no rows") from None
        raise DataFileError(f"data file {path} cannot be read as {builder}: {type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}") from None
    finally:
        if bars:
            datasets.utils.logging.enable_progress_bar()
    if len(ds) == 0:
        raise DataFileError(f"data file {path} has no rows (columns: {ds.column_names})")
    return ds


def require_columns(ds: datasets.Dataset, columns: Sequence[str], where, flags: Sequence[str] = ()) -> None:
    """Raises :class:`DataFileError` listing the columns found when any of ``columns`` is missing."""
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        hint = f"; choose others with {', '.join(flags)}" if flags else ""
        raise DataFileError(f"{where}: no column {missing[0]!r}" + (f" (nor {missing[1:]})" if missing[1:] else "")
                            + f"; the columns are {ds.column_names}{hint}")


def local_splits(train_file, validation_file=None, test_file=None, *, seed: int = 0,
                 splits: Sequence[float] = (0.8, 0.1, 0.1), stratify: str | None = None) -> datasets.DatasetDict:
    """``train`` / ``validation`` / ``test`` from local files.

    With both ``validation_file`` and ``test_file`` the three files are the three splits. Otherwise
    the missing ones are cut from ``train_file`` by :func:`jlora.data.split_indices` (seeded; stratified
    by the ``stratify`` column when the file has it; exact duplicate rows kept in one split) with
    ``splits`` renormalised over the splits being cut: with only a validation file, ``(0.8, 0.1,
    0.1)`` cuts train / test as 8 : 1. Every file must have the training file's columns.
    """
    train = read_table(train_file)
    given = {"validation": validation_file, "test": test_file}
    tables = {name: read_table(f) for name, f in given.items() if f is not None}
    for name, ds in tables.items():
        missing = sorted(set(train.column_names) - set(ds.column_names))
        if missing:
            raise DataFileError(f"{name} file {given[name]} lacks the training file's columns {missing}; "
                                f"its columns are {ds.column_names}")
        tables[name] = ds.select_columns(train.column_names)
    cut = [name for name in SPLIT_NAMES if name == "train" or name not in tables]
    if len(cut) == 1:
        return datasets.DatasetDict({"train": train, **tables})
    fractions = [float(f) for f, name in zip(splits, SPLIT_NAMES) if name in cut]
    if len(splits) != 3 or any(f < 0 for f in splits) or sum(fractions) <= 0:
        raise ValueError(f"splits must be three non-negative fractions (train, validation, test); got {tuple(splits)}")
    fractions = [f / sum(fractions) for f in fractions] + [0.0] * (3 - len(fractions))
    labels = _column(train, stratify) if stratify and stratify in train.column_names else [0] * len(train)
    groups = [repr(tuple(row.values())) for row in train] if len(train) <= 200_000 else None
    idx = split_indices([repr(x) for x in labels], seed=seed, splits=fractions, groups=groups)
    parts = {name: train.select(i) for name, i in zip(cut, idx)}
    small = [f"{name} ({len(ds)} rows)" for name, ds in parts.items() if len(ds) == 0]
    if small:
        raise DataFileError(f"data file {train_file} has {len(train)} rows, too few to cut {', '.join(small)}; "
                            f"give more rows or the split as its own file (--validation-file / --test-file)")
    return datasets.DatasetDict({name: parts[name] if name in parts else tables[name] for name in SPLIT_NAMES})


def encode_labels(splits: datasets.DatasetDict, column: str) -> tuple[tuple[str, ...], datasets.DatasetDict]:
    """``(label names, splits with integer labels)``.

    A ``ClassLabel`` column keeps its names. Strings are mapped to their index in sorted order;
    integers ``0..k-1`` are kept as they are (names ``"0"`` ...), other integers are ranked like
    strings. A label in validation / test that training never shows raises :class:`DataFileError`.
    Missing labels (``None`` / empty) raise, naming the first row.
    """
    feature = splits["train"].features.get(column)
    if isinstance(feature, datasets.ClassLabel):
        return tuple(feature.names), splits
    values = {name: _column(ds, column) for name, ds in splits.items()}
    for name, vals in values.items():
        for i, v in enumerate(vals):
            if v is None or (isinstance(v, str) and not v.strip()) or (isinstance(v, float) and np.isnan(v)):
                raise DataFileError(f"{name} split, row {i}: label column {column!r} is empty")
    seen = sorted(set(values["train"]), key=lambda v: (isinstance(v, str), v))
    if len(seen) < 2:
        raise DataFileError(f"label column {column!r} has {len(seen)} distinct value(s) in training ({seen}); "
                            "classification needs at least 2")
    integral = all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in seen)
    if integral and seen == list(range(len(seen))):
        names, index = tuple(str(v) for v in seen), {v: v for v in seen}
    else:
        names = tuple(str(v) for v in seen)
        index = {v: i for i, v in enumerate(seen)}
    for name, vals in values.items():
        unknown = sorted({repr(v) for v in vals if v not in index})
        if unknown:
            raise DataFileError(f"{name} split has labels training never shows: {unknown[:10]}; "
                                f"training labels: {list(names)}")
    out = {}
    for name, ds in splits.items():
        ids = [index[v] for v in values[name]]
        ds = ds.remove_columns(column).add_column(column, ids)
        out[name] = ds.cast_column(column, datasets.ClassLabel(names=list(names)))
    return names, datasets.DatasetDict(out)


def labelled_splits(path, validation_file=None, test_file=None, *, seed: int = 0, input_column: str,
                    label_column: str, flags: Sequence[str] = ()) -> datasets.DatasetDict:
    """A classification file as splits: :func:`local_splits` stratified by ``label_column``, both
    columns required (:func:`require_columns`, naming ``flags``), labels made class ids
    (:func:`encode_labels`; the names are the ``ClassLabel`` feature's)."""
    splits = local_splits(path, validation_file, test_file, seed=seed, stratify=label_column)
    require_columns(splits["train"], [input_column, label_column], f"data file {path}", flags)
    return encode_labels(splits, label_column)[1]
