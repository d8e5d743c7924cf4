"""jlora.data.files and jlora.data.chat: local tables in every format, seeded splits or separate
files, label sets read from the data, plain-text packing, and errors that list the columns found."""

import csv
import json

import numpy as np
import pandas as pd
import pytest

from jlora.data import batches, chat, files


ROWS = [{"text": f"row number {i} says {'yes' if i % 3 else 'no'}", "label": "yes" if i % 3 else "no"} for i in range(30)]


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".json", ".jsonl", ".parquet", ".csv.gz"])
def test_every_format_reads_the_same_rows(tmp_path, suffix):
    df = pd.DataFrame(ROWS)
    path = tmp_path / f"data{suffix}"
    if suffix in (".csv", ".csv.gz"):
        df.to_csv(path, index=False)
    elif suffix == ".tsv":
        df.to_csv(path, index=False, sep="\t")
    elif suffix == ".json":
        path.write_text(json.dumps(ROWS))
    elif suffix == ".jsonl":
        df.to_json(path, orient="records", lines=True)
    else:
        df.to_parquet(path)
    ds = files.read_table(path)
    assert ds.column_names == ["text", "label"] and ds["text"] == [r["text"] for r in ROWS]


def test_splits_are_seeded_stratified_or_taken_from_files(tmp_path):
    pd.DataFrame(ROWS).to_csv(tmp_path / "train.csv", index=False)
    a = files.local_splits(tmp_path / "train.csv", seed=0, stratify="label")
    b = files.local_splits(tmp_path / "train.csv", seed=0, stratify="label")
    assert {k: len(v) for k, v in a.items()} == {"train": 24, "validation": 3, "test": 3}
    assert a["test"]["text"] == b["test"]["text"]                                 # seeded
    assert not set(a["train"]["text"]) & set(a["test"]["text"])                  # disjoint
    pd.DataFrame(ROWS[:5]).to_csv(tmp_path / "val.csv", index=False)
    c = files.local_splits(tmp_path / "train.csv", tmp_path / "val.csv", seed=0)
    assert c["validation"]["text"] == [r["text"] for r in ROWS[:5]] and len(c["train"]) + len(c["test"]) == 30
    pd.DataFrame({"other": [1]}).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(files.DataFileError, match=r"lacks the training file's columns \['label', 'text'\]"):
        files.local_splits(tmp_path / "train.csv", test_file=tmp_path / "bad.csv")


def test_labels_are_read_from_the_data(tmp_path):
    pd.DataFrame(ROWS).to_csv(tmp_path / "d.csv", index=False)
    names, splits = files.encode_labels(files.local_splits(tmp_path / "d.csv", stratify="label"), "label")
    assert names == ("no", "yes") and set(splits["train"]["label"]) == {0, 1}
    assert all(names[l] == ("yes" if "yes" in t else "no") for t, l in zip(splits["train"]["text"], splits["train"]["label"]))
    pd.DataFrame({"text": ["a", "b", "c"], "label": [0, 1, 2]}).to_csv(tmp_path / "i.csv", index=False)
    pd.DataFrame({"text": ["d"], "label": [7]}).to_csv(tmp_path / "j.csv", index=False)
    with pytest.raises(files.DataFileError, match=r"labels training never shows: \['7'\]"):
        files.encode_labels(files.local_splits(tmp_path / "i.csv", tmp_path / "j.csv", tmp_path / "j.csv"), "label")
    names, _ = files.encode_labels(files.local_splits(tmp_path / "i.csv", tmp_path / "i.csv", tmp_path / "i.csv"), "label")
    assert names == ("0", "1", "2")


def test_bad_files_name_the_problem(tmp_path):
    with pytest.raises(files.DataFileError, match="does not exist"):
        files.read_table(tmp_path / "none.csv")
    (tmp_path / "e.jsonl").write_text("")
    with pytest.raises(files.DataFileError, match="is empty"):
        files.read_table(tmp_path / "e.jsonl")
    (tmp_path / "h.csv").write_text("text,label\n")
    with pytest.raises(files.DataFileError, match=r"h.csv has no rows"):
        files.read_table(tmp_path / "h.csv")
    (tmp_path / "broken.jsonl").write_text('{"text": "a"}\n{not json\n')
    with pytest.raises(files.DataFileError, match="cannot be read as json"):
        files.read_table(tmp_path / "broken.jsonl")
    with pytest.raises(files.DataFileError, match=r"unknown format '.txt'"):
        files.read_table(tmp_path / "notes.txt")
    pd.DataFrame(ROWS).to_csv(tmp_path / "d.csv", index=False)
    with pytest.raises(files.DataFileError, match=r"no column 'sentence'; the columns are \['text', 'label'\]; choose"):
        files.require_columns(files.read_table(tmp_path / "d.csv"), ["sentence"], "d.csv", ["--text-column"])


class _WordTokenizer:
    """A tokenizers.Tokenizer with a word-level vocabulary, for exact counts."""

    @staticmethod
    def make():
        from tokenizers import Tokenizer, models, pre_tokenizers

        vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "</s>", "a", "b", "c", "d", "[UNK]"])}
        tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        tok.add_special_tokens(["<pad>", "<s>", "</s>"])
        return tok


def test_texts_pack_into_full_rows_and_pairs_supervise_the_response():
    tok = _WordTokenizer.make()
    fmt = chat.TextFormat(eos_token="</s>")
    plain = chat.tokenize_texts(["a b c", "d"], tok, fmt, max_length=5)
    assert plain["input_ids"].tolist() == [[3, 4, 5, 2, 0], [6, 2, 0, 0, 0]]
    assert plain["labels"][1].tolist() == [6, 2, -100, -100, -100]
    packed = chat.tokenize_texts(["a b c", "d", "a b"], tok, fmt, max_length=4, packing=True)   # 9 tokens
    assert packed["input_ids"].tolist() == [[3, 4, 5, 2], [6, 2, 3, 4]] and packed["attention_mask"].all()
    # one segment per document; no document's first token is a target (nothing predicts across them)
    assert packed["segment_ids"].tolist() == [[1, 1, 1, 1], [1, 1, 2, 2]]
    assert packed["labels"].tolist() == [[-100, 4, 5, 2], [-100, 2, -100, 4]]
    pairs = chat.tokenize_pairs(["a b"], ["c d"], tok, fmt, max_length=6)
    assert pairs["input_ids"][0].tolist() == [3, 4, 5, 6, 2, 0]
    assert pairs["labels"][0].tolist() == [-100, -100, 5, 6, 2, -100]


def test_conversations_are_checked():
    fmt = chat.TextFormat("{% for m in messages %}{{ m['content'] }} {% endfor %}", eos_token="</s>")
    tok = _WordTokenizer.make()
    with pytest.raises(ValueError, match="row 0: no assistant message"):
        chat.tokenize_conversations([[{"role": "user", "content": "a"}]], tok, fmt, 8)
    with pytest.raises(ValueError, match="row 0, message 0: role 'robot' is not one of"):
        chat.tokenize_conversations([[{"role": "robot", "content": "a"}]], tok, fmt, 8)
    out = chat.tokenize_conversations(['[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b c"}]'],
                                      tok, fmt, 8)
    assert out["labels"][0].tolist()[:3] == [-100, 4, 5]                 # JSON strings accepted
    rewriting = chat.TextFormat("{{ messages | length }}{% for m in messages %}{{ m['content'] }}{% endfor %}")
    with pytest.raises(ValueError, match="does not render turn 1 as a continuation"):
        chat.tokenize_conversations([[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]],
                                    tok, rewriting, 8)


def test_batches_start_at_a_data_position():
    arrays = {"x": np.arange(23)}
    full = [b["x"].tolist() for b, _ in zip(batches(arrays, 5, seed=1, epochs=None), range(13))]
    for k in (0, 1, 4, 5, 12):
        rest = [b["x"].tolist() for b, _ in zip(batches(arrays, 5, seed=1, epochs=None, start=k), range(13 - k))]
        assert rest == full[k:]
    with pytest.raises(ValueError, match="start must be a non-negative int"):
        batches(arrays, 5, start=-1)


def test_pairs_and_conversations_pack_with_their_masks():
    tok = _WordTokenizer.make()
    fmt = chat.TextFormat(eos_token="</s>")
    packed = chat.tokenize_pairs(["a", "b a"], ["c", "d d"], tok, fmt, max_length=4, packing=True)
    # stream: a c </s> | b a d d </s>  ->  rows [a c </s> b] [a d d </s>], prompts unsupervised
    assert packed["input_ids"].tolist() == [[3, 5, 2, 4], [3, 6, 6, 2]]
    assert packed["labels"].tolist() == [[-100, 5, 2, -100], [-100, 6, 6, 2]] and packed["attention_mask"].all()
    assert packed["segment_ids"].tolist() == [[1, 1, 1, 2], [1, 1, 1, 1]]
    fmt = chat.TextFormat("{% for m in messages %}{{ m['content'] }} {% endfor %}", eos_token="</s>")
    conv = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b c"}]
    packed = chat.tokenize_conversations([conv, conv], tok, fmt, 3, packing=True)
    assert packed["input_ids"].tolist() == [[3, 4, 5], [3, 4, 5]] and packed["labels"][:, 0].tolist() == [-100, -100]
