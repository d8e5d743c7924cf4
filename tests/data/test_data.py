"""jlora.data: real corpora (exact counts), seeded/stratified/disjoint splits, tokenisation with
exact label masking on the real MiniLM tokenizer, deterministic batching, and the BIG-bench sdist
reader on a synthetic tar.

The only skip in this file is ``test_real_bigbench_natural_instructions`` (marker
``real_bigbench``): it reads the real 358 MB ``bigbench-1.0.0.tar.gz`` sdist and runs only when that
archive (or the task file extracted from it) is already in ``jlora.assets.cache_dir()``; downloading
it is too slow for this suite. The reader logic itself is always tested on a synthetic tar.
"""

import collections
import io
import json
import os
import tarfile
import warnings

import numpy as np
import pytest
from tokenizers import Tokenizer

from jlora import assets, data
from jlora.data import instruct

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

with warnings.catch_warnings():    # the marker belongs in pyproject's [tool.pytest.ini_options] markers
    warnings.simplefilter("ignore", pytest.PytestUnknownMarkWarning)
    real_bigbench = pytest.mark.real_bigbench

# exact counts of the shipped corpora
RT_FRESH, RT_ROTTEN = 7368, 5384              # 7,403 / 5,405 before dropping 56 duplicate texts
BBC_COUNTS = {"sports": 511, "business": 510, "politics": 417, "tech": 401, "entertainment": 386}
CHATTERBOT_PAIRS, CHATTERBOT_UNIQUE = 2306, 1176


@pytest.fixture(scope="module")
def rt():
    return data.rotten_tomatoes(seed=0)


@pytest.fixture(scope="module")
def bbc():
    return data.bbc_news(seed=0)


@pytest.fixture(scope="module")
def tok():
    t = Tokenizer.from_file(str(assets.path("minilm", "model", "tokenizer.json")))
    t.no_padding()
    t.no_truncation()
    return t


def _label_counts(ds):
    names = ds.features["label"].names
    return collections.Counter(names[i] for i in ds["label"][:])


def _check_splits(dd, expected_total, tol):
    assert list(dd) == ["train", "validation", "test"]
    texts = {k: v["text"][:] for k, v in dd.items()}
    sets = {k: set(v) for k, v in texts.items()}
    assert sum(len(v) for v in texts.values()) == expected_total
    assert not sets["train"] & sets["validation"]          # no text in two splits
    assert not sets["train"] & sets["test"]
    assert not sets["validation"] & sets["test"]
    total = collections.Counter()
    for v in dd.values():
        total.update(_label_counts(v))
    n = sum(total.values())
    for name, ds in dd.items():                              # label proportions kept per split
        c = _label_counts(ds)
        for label in total:
            assert abs(c[label] / len(ds) - total[label] / n) < tol, (name, label)
    sizes = [len(dd[k]) / expected_total for k in ("train", "validation", "test")]
    np.testing.assert_allclose(sizes, [0.8, 0.1, 0.1], atol=0.01)


# ------------------------------------------------------------------------------------------------
# corpora

def test_rotten_tomatoes_counts(rt):
    assert rt["train"].features["label"].names == ["rotten", "fresh"]
    assert rt["train"].column_names == ["text", "label"]
    total = collections.Counter()
    for ds in rt.values():
        total.update(_label_counts(ds))
    assert total == {"fresh": RT_FRESH, "rotten": RT_ROTTEN}
    all_texts = [t for ds in rt.values() for t in ds["text"][:]]
    assert len(set(all_texts)) == len(all_texts) == RT_FRESH + RT_ROTTEN
    frame = data.text.rotten_tomatoes_frame()                # the same rows, before splitting
    assert sorted(frame.text) == sorted(all_texts) and int(frame.label.sum()) == RT_FRESH


def test_rotten_tomatoes_splits(rt):
    _check_splits(rt, RT_FRESH + RT_ROTTEN, tol=0.005)
    again = data.rotten_tomatoes(seed=0)
    for k in rt:
        assert again[k]["text"][:] == rt[k]["text"][:] and again[k]["label"][:] == rt[k]["label"][:]
    other = data.rotten_tomatoes(seed=1)
    assert set(other["test"]["text"][:]) != set(rt["test"]["text"][:])


def test_bbc_news_counts_and_splits(bbc):
    names = bbc["train"].features["label"].names
    assert names == sorted(BBC_COUNTS) == list(data.BBC_LABELS)
    total = collections.Counter()
    for ds in bbc.values():
        total.update(_label_counts(ds))
    assert total == BBC_COUNTS and sum(total.values()) == 2225
    # 98 duplicate articles are kept, but every copy sits in one split: texts are disjoint
    _check_splits(bbc, 2225, tol=0.02)
    all_texts = [t for ds in bbc.values() for t in ds["text"][:]]
    assert len(all_texts) - len(set(all_texts)) == 98
    first = next(t for t in all_texts if t.startswith("Ad sales boost Time Warner profit\n\n"))
    assert "TimeWarner jumped 76%" in first and "£600m" in first      # latin-1 decoded
    again = data.bbc_news(seed=0)
    assert again["test"]["text"][:] == bbc["test"]["text"][:]


def test_split_indices_groups_and_validation():
    labels = [0] * 60 + [1] * 40
    groups = [i // 2 for i in range(100)]                   # pairs of rows must stay together
    tr, va, te = data.split_indices(labels, seed=3, splits=(0.6, 0.2, 0.2), groups=groups)
    assert sorted(np.concatenate([tr, va, te]).tolist()) == list(range(100))
    where = {i: k for k, part in enumerate((tr, va, te)) for i in part}
    assert all(where[2 * g] == where[2 * g + 1] for g in range(50))
    assert [len(tr), len(va), len(te)] == [60, 20, 20]
    assert sum(labels[i] for i in te) == 8                  # 40 % of 20
    again = data.split_indices(labels, seed=3, splits=(0.6, 0.2, 0.2), groups=groups)
    assert all(np.array_equal(a, b) for a, b in zip((tr, va, te), again))
    with pytest.raises(ValueError):
        data.split_indices(labels, splits=(0.8, 0.3, 0.1))
    with pytest.raises(ValueError):
        data.split_indices(labels, splits=(0.9, 0.1))


def test_chatterbot_pairs():
    raw = data.chatterbot_conversations(dedupe=False)
    assert len(raw) == CHATTERBOT_PAIRS > 1500
    ds = data.chatterbot_conversations()
    assert len(ds) == CHATTERBOT_UNIQUE                     # tech_support.yml repeats 10 pairs 105 times
    assert ds.column_names == ["instruction", "input", "response", "category"]
    assert ds[0] == {"instruction": "What is AI?", "input": "",
                     "response": "Artificial Intelligence is the branch of engineering and science devoted "
                                 "to constructing machines that think.", "category": "ai"}
    assert len(set(zip(ds["instruction"][:], ds["response"][:]))) == len(ds)
    assert {"ai", "tech_support", "trivia", "greetings"} <= set(ds["category"][:])
    dd = data.instruction_data("chatterbot", seed=0)
    assert sum(len(v) for v in dd.values()) == CHATTERBOT_UNIQUE
    prompts = {k: set(v["instruction"][:]) for k, v in dd.items()}
    assert not prompts["train"] & prompts["test"] and not prompts["train"] & prompts["validation"]
    assert not prompts["validation"] & prompts["test"]
    assert data.instruction_data("chatterbot", seed=0)["test"]["response"][:] == dd["test"]["response"][:]
    with pytest.raises(ValueError):
        data.instruction_data("alpaca")


# ------------------------------------------------------------------------------------------------
# tokenisation

def test_format_prompt_template():
    assert data.format_prompt("Say hi.", "") == "### Instruction:\nSay hi.\n\n### Response:\n"
    assert data.format_prompt("Say hi.", "to Bob") == \
        "### Instruction:\nSay hi.\n\n### Input:\nto Bob\n\n### Response:\n"
    assert data.INSTRUCTION_TEMPLATE.format(instruction="a", input="b") == data.format_prompt("a", "b")
    assert instruct.chat_prompt("Say hi.", "to Bob") == \
        "<|im_start|>user\nSay hi.\n\nto Bob<|im_end|>\n<|im_start|>assistant\n"


def test_tokenize_instructions_masking_exact(tok):
    rows = [{"instruction": "Name the capital of France.", "input": "", "response": "paris is the capital."},
            {"instruction": "Translate to French.", "input": "good morning", "response": "bonjour"}]
    out = data.tokenize_instructions(rows, tok, 40, eos_token="[SEP]")
    assert set(out) == {"input_ids", "attention_mask", "labels"}
    assert all(v.shape == (2, 40) and v.dtype == np.int32 for v in out.values())
    sep = tok.token_to_id("[SEP]")
    for i, r in enumerate(rows):
        p = tok.encode(data.format_prompt(r["instruction"], r["input"]), add_special_tokens=False).ids
        a = tok.encode(r["response"], add_special_tokens=False).ids + [sep]
        n = len(p) + len(a)
        ids, mask, lab = out["input_ids"][i], out["attention_mask"][i], out["labels"][i]
        assert ids[:n].tolist() == p + a and (ids[n:] == 0).all()
        assert mask.tolist() == [1] * n + [0] * (40 - n)
        assert lab.tolist() == [-100] * len(p) + a + [-100] * (40 - n)
        assert tok.decode(lab[lab != -100].tolist()) == r["response"]
    assert "# # # input : good morning # # # response" in tok.decode(out["input_ids"][1].tolist())
    assert "input" not in tok.decode(out["input_ids"][0].tolist())    # empty input: no Input block
    # the same through a datasets.Dataset and a dict of columns
    import datasets
    ds = datasets.Dataset.from_list(rows)
    for src in (ds, {k: [r[k] for r in rows] for k in rows[0]}):
        got = data.tokenize_instructions(src, tok, 40, eos_token="[SEP]")
        assert all(np.array_equal(got[k], out[k]) for k in out)


def test_tokenize_instructions_truncation_and_chat(tok):
    row = {"instruction": "Repeat the words.", "input": "", "response": "one two three four five six"}
    p = tok.encode(data.format_prompt(row["instruction"]), add_special_tokens=False).ids
    r = tok.encode(row["response"], add_special_tokens=False).ids
    L = len(p) + 3                                          # keeps the prompt and 3 response tokens
    out = data.tokenize_instructions([row], tok, L, eos_token="[SEP]")
    assert out["input_ids"][0].tolist() == p + r[:3] and out["attention_mask"][0].all()
    assert out["labels"][0].tolist() == [-100] * len(p) + r[:3]
    short = data.tokenize_instructions([row], tok, 4)      # prompt alone overflows: keeps its start
    assert short["input_ids"][0].tolist() == p[:4] and (short["labels"] == -100).all()
    chat = data.tokenize_instructions([row], tok, 64, chat=True)
    ids, lab = chat["input_ids"][0], chat["labels"][0]
    text = tok.decode(ids[chat["attention_mask"][0] == 1].tolist())
    assert text.startswith("< | im _ start | > user repeat the words.")
    end = tok.encode("<|im_end|>", add_special_tokens=False).ids
    kept = lab[lab != -100].tolist()
    assert kept == r + end and tok.decode(kept[:len(r)]) == row["response"]
    with pytest.raises(ValueError):
        data.tokenize_instructions([row], tok, 16, eos_token="<no-such-token>")


def test_tokenize_classification(rt, tok):
    fresh = Tokenizer.from_file(str(assets.path("minilm", "model", "tokenizer.json")))   # pads to 128
    before = (fresh.padding, fresh.truncation)
    small = {k: rt[k].select(range(300)) for k in ("validation", "test")}
    arrays = data.tokenize_classification(small, fresh, 32)
    assert (fresh.padding, fresh.truncation) == before      # the caller's tokenizer is untouched
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    for split, a in arrays.items():
        assert set(a) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
        assert a["input_ids"].shape == a["attention_mask"].shape == a["token_type_ids"].shape == (300, 32)
        assert all(v.dtype == np.int32 for v in a.values())
        assert a["labels"].tolist() == small[split]["label"][:]
        assert (a["input_ids"][:, 0] == cls).all() and (a["token_type_ids"] == 0).all()
        lengths = a["attention_mask"].sum(1)
        assert (a["input_ids"][np.arange(300), lengths - 1] == sep).all()
        assert (a["input_ids"] * (1 - a["attention_mask"]) == 0).all()   # padding is [PAD] = 0
        assert (lengths == 32).any() and (lengths < 32).any()             # truncated and padded rows
        t0 = small[split][0]["text"]
        want = tok.encode(t0).ids
        want = want[:31] + [sep] if len(want) > 32 else want
        assert a["input_ids"][0, :len(want)].tolist() == want


# ------------------------------------------------------------------------------------------------
# batching

def test_batches_deterministic_and_disjoint():
    arrays = {"x": np.arange(103), "y": np.arange(103) * 10}
    run = lambda **kw: list(data.batches(arrays, 10, seed=7, **kw))        # noqa: E731
    one = run(epochs=2)
    assert len(one) == 20 and all(b["x"].shape == (10,) for b in one)
    assert all((b["y"] == b["x"] * 10).all() for b in one)
    again = run(epochs=2)
    assert all(np.array_equal(a["x"], b["x"]) for a, b in zip(one, again))
    for epoch in (one[:10], one[10:]):
        seen = np.concatenate([b["x"] for b in epoch])
        assert len(seen) == len(set(seen.tolist())) == 100           # disjoint within an epoch
    assert not np.array_equal(one[0]["x"], one[10]["x"])               # reshuffled each epoch
    other = list(data.batches(arrays, 10, seed=8))
    assert not np.array_equal(other[0]["x"], one[0]["x"])
    tail = run(epochs=1, drop_remainder=False)
    assert [len(b["x"]) for b in tail] == [10] * 10 + [3]
    assert sorted(np.concatenate([b["x"] for b in tail]).tolist()) == list(range(103))
    plain = list(data.batches(arrays, 50, shuffle=False))
    assert plain[0]["x"].tolist() == list(range(50))
    forever = data.batches(arrays, 10, seed=7, epochs=None)
    assert all(np.array_equal(next(forever)["x"], b["x"]) for b in one)   # epochs=None continues
    with pytest.raises(ValueError):
        data.batches({"x": np.arange(3), "y": np.arange(4)}, 2)
    with pytest.raises(ValueError):
        data.batches(arrays, 200, epochs=None)


# ------------------------------------------------------------------------------------------------
# BIG-bench sdist reader

def _synthetic_bigbench(path):
    base = "bigbench-1.0.0/bigbench/benchmark_tasks/"
    prefix = "Definition: Answer the question. Prompt: Give the answer."
    files = {
        base + "toy_nli/task.json": {"name": "toy_nli", "examples": [
            {"input": "A. B?", "target_scores": {"yes": 1, "no": 0}}]},
        base + "natural_instructions/task.json": {"name": "natural_instructions", "description": "parent"},
        base + "natural_instructions/subtask001_toy_qa/task.json": {
            "name": "subtask001_toy_qa", "task_prefix": prefix + "  ",
            "examples": [{"input": f"Q{i}?", "target": [f"A{i}", "other"]} for i in range(20)]
            + [{"input": "Qs?", "target": "single"}, {"input": "Qx?", "target_scores": {"a": 1}}]},
        base + "natural_instructions/subtask002_toy_gen/task.json": {
            "name": "subtask002_toy_gen", "task_prefix": "Generate.", "examples": [{"input": "x", "target": ["y"]}]},
    }
    with tarfile.open(path, "w:gz") as tar:
        for name, obj in list(files.items()) + [(base + "toy_nli/README.md", "# readme")]:
            raw = (obj if isinstance(obj, str) else json.dumps(obj)).encode()
            info = tarfile.TarInfo(name)
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return path


def test_bigbench_reader_synthetic_tar(tmp_path):
    archive = _synthetic_bigbench(tmp_path / "bigbench-1.0.0.tar.gz")
    cache = tmp_path / "cache"
    kw = {"archive": archive, "cache_dir": cache}
    task = data.bigbench_task("toy_nli", **kw)
    assert task["examples"][0]["target_scores"] == {"yes": 1, "no": 0}
    assert (cache / "toy_nli" / "task.json").is_file()
    assert not (cache / "natural_instructions").exists()   # only the wanted member was extracted
    assert not (cache / "toy_nli" / "README.md").exists()

    ni = data.natural_instructions("subtask001", **kw)     # unique prefix of the subtask name
    assert len(ni) == 21                                    # the target_scores example is skipped
    assert ni[0] == {"instruction": "Definition: Answer the question. Prompt: Give the answer.",
                     "input": "Q0?", "response": "A0", "category": "subtask001_toy_qa"}
    assert ni[20]["response"] == "single"
    assert not (cache / "natural_instructions" / "subtask002_toy_gen").exists()

    archive.rename(tmp_path / "gone.tar.gz")               # cached files no longer need the archive
    assert data.bigbench_task("natural_instructions", "subtask001_toy_qa", **kw)["name"] == "subtask001_toy_qa"
    assert data.bigbench_task("toy_nli", **kw)["name"] == "toy_nli"
    (tmp_path / "gone.tar.gz").rename(archive)

    with pytest.raises(ValueError, match="ambiguous"):
        data.bigbench_task("natural_instructions", "subtask00", **kw)
    with pytest.raises(KeyError, match="toy_nli"):
        data.bigbench_task("toy_nl", **kw)
    for bad in ("../etc", "a/b", ""):
        with pytest.raises(ValueError):
            data.bigbench_task(bad, **kw)

    dd = data.instruction_data("natural_instructions:subtask002_toy_gen", **kw)
    assert sum(len(v) for v in dd.values()) == 1
    dd = data.instruction_data("natural_instructions:subtask001", seed=1, **kw)
    assert sorted(len(v) for v in dd.values()) == [2, 2, 17]
    got = data.bigbench_extract(["toy_nli/task.json", "natural_instructions/subtask002_toy_gen/task.json"], **kw)
    assert got == [cache / "toy_nli" / "task.json", cache / "natural_instructions" / "subtask002_toy_gen" / "task.json"]
    assert all(p.is_file() for p in got)
    with pytest.raises(FileNotFoundError):
        data.bigbench_extract(["missing_task/task.json"], **kw)


def _real_bigbench_available():
    if os.environ.get("JLORA_NO_BIGBENCH"):
        return False
    root = assets.cache_dir()
    cached = root / "bigbench" / "natural_instructions" / "subtask047_misc_answering_science_questions" / "task.json"
    return cached.is_file() or (root / "bigbench-1.0.0.tar.gz").is_file()


@real_bigbench
@pytest.mark.skipif(not _real_bigbench_available(),
                    reason="needs the bigbench-1.0.0 sdist in jlora.assets.cache_dir() (358 MB; not downloaded "
                           "by tests): pip download --no-deps --no-binary :all: -d ~/.cache/jlora bigbench==1.0.0")
def test_real_bigbench_natural_instructions():
    ds = data.natural_instructions("subtask047_misc_answering_science_questions")
    assert len(ds) == 251
    assert ds[0]["response"] == "D." and ds[0]["input"].startswith("Question: When a guitar string is plucked")
    assert ds[0]["instruction"].startswith("Definition: In this subtask you will answer a simple science")
    assert set(ds["response"][:]) == {"A.", "B.", "C.", "D."}
