"""jlora.data.check and ``jlora data check``: every planted problem is found with the right count,
split and row; a clean set reports none; MinHash + LSH finds the pairs the exact Jaccard finds."""

import argparse
import json

import datasets
import numpy as np
import pandas as pd
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from jlora.data import check as dc


def words(rng, n):
    return " ".join(f"w{int(i)}" for i in rng.integers(0, 50_000, size=n))


def tiny_tokenizer():
    """One token per whitespace-separated word (unknown words -> [UNK]): lengths are word counts."""
    tok = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok


def ds(**cols):
    return datasets.Dataset.from_dict(cols)


def by_check(result, check, split=None):
    found = [p for p in result["problems"] if p["check"] == check
             and (split is None or p.get("split") == split or p.get("splits", [None])[-1] == split)]
    return found


def classification_splits(rng, planted=True):
    texts = {name: [words(rng, 12) for _ in range(n)] for name, n in (("train", 16), ("validation", 6), ("test", 6))}
    labels = {name: [i % 2 for i in range(len(t))] for name, t in texts.items()}
    if planted:
        tr = texts["train"]
        tr[3] = "   \n"                                   # empty
        tr[5] = "  " + tr[1].upper().replace(" ", "   ")  # exact duplicate of row 1 after normalisation
        labels["train"][5] = labels["train"][1]
        tr[7] = tr[2]                                     # conflicting label
        labels["train"][7] = 1 - labels["train"][2]
        tr[9] = words(rng, 40)
        texts["test"][4] = tr[9].rsplit(" ", 1)[0] + " different"   # near-duplicate: the last word differs
        tr[11] = words(rng, 60)                           # over-long (60 tokens > 50)
    return {name: ds(text=texts[name], label=labels[name]) for name in texts}


def test_planted_classification_problems_are_found_where_they_are():
    splits = classification_splits(np.random.default_rng(0))
    r = dc.check(splits, kind="classification", tokenizer=tiny_tokenizer(), max_length=50)
    json.dumps(r)                                          # JSON-able
    assert {p["check"] for p in r["problems"]} == {"empty", "duplicate", "conflict", "near_duplicate", "too_long"}
    (empty,) = by_check(r, "empty")
    assert (empty["severity"], empty["split"], empty["count"]) == ("error", "train", 1)
    assert empty["examples"][0]["row"] == 3 and empty["fields"] == {"text": 1}
    (dup,) = by_check(r, "duplicate")
    assert (dup["split"], dup["count"]) == ("train", 1)
    assert (dup["examples"][0]["row"], dup["examples"][0]["duplicate_of"]) == (5, 1)
    (conflict,) = by_check(r, "conflict")
    assert (conflict["severity"], conflict["split"], conflict["count"]) == ("warning", "train", 1)
    assert conflict["examples"][0]["rows"] == [2, 7]
    (near,) = by_check(r, "near_duplicate")
    assert (near["severity"], near["splits"], near["count"]) == ("warning", ["train", "test"], 1)
    e = near["examples"][0]
    assert (e["split"], e["row"], e["other"]["split"], e["other"]["row"]) == ("test", 4, "train", 9)
    assert e["similarity"] == pytest.approx(35 / 37, abs=1e-3)          # 36 shingles each, 35 shared
    (long,) = by_check(r, "too_long")
    assert (long["split"], long["count"], long["max_excess"]) == ("train", 1, 10)
    assert long["examples"][0]["row"] == 11 and long["examples"][0]["tokens"] == 60
    assert r["summary"] == {"error": 1, "warning": 4, "info": 0}
    assert r["lengths"]["unit"] == "tokens" and r["lengths"]["splits"]["train"]["max"] == 60
    md = dc.report_markdown(r)
    assert "`near_duplicate`" in md and "test row 4" in md and "train row 9" in md


def test_a_clean_set_reports_no_problem():
    splits = classification_splits(np.random.default_rng(1), planted=False)
    r = dc.check(splits, kind="classification", tokenizer=tiny_tokenizer(), max_length=50)
    assert r["problems"] == [] and r["summary"] == {"error": 0, "warning": 0, "info": 0}
    assert r["label_balance"]["splits"]["train"] == {"counts": {"0": 8, "1": 8}, "imbalance": 1.0, "missing": []}
    r = dc.check(splits, kind="classification")                         # no tokenizer: characters
    assert r["problems"] == [] and r["unit"] == "characters"
    assert "No problems found." in dc.report_markdown(r)


def test_leakage_label_balance_and_missing_classes():
    rng = np.random.default_rng(2)
    train_texts = [words(rng, 10) for _ in range(25)]
    test_texts = [words(rng, 10) for _ in range(4)] + [train_texts[6].title()]      # row 4: a training text
    names = ["a", "b", "c"]
    feature = datasets.ClassLabel(names=names)
    splits = {"train": datasets.Dataset.from_dict({"text": train_texts, "label": [0] * 20 + [1] * 5},
                                                  features=datasets.Features({"text": datasets.Value("string"),
                                                                              "label": feature})),
              "test": datasets.Dataset.from_dict({"text": test_texts, "label": [0, 1, 2, 2, 0]},
                                                 features=datasets.Features({"text": datasets.Value("string"),
                                                                             "label": feature}))}
    r = dc.check(splits, kind="classification")
    (leak,) = by_check(r, "leakage")
    assert (leak["severity"], leak["splits"], leak["count"]) == ("error", ["train", "test"], 1)
    assert (leak["examples"][0]["row"], leak["examples"][0]["other"]["row"]) == (4, 6)
    assert "1 of them with the same label" in leak["message"]
    (imb,) = by_check(r, "imbalance")
    assert (imb["split"], imb["ratio"]) == ("train", 4.0)
    (missing,) = by_check(r, "missing_class")
    assert (missing["severity"], missing["split"], missing["classes"]) == ("error", "train", ["c"])
    assert r["label_balance"]["splits"]["test"]["counts"] == {"a": 2, "b": 1, "c": 2}
    assert not by_check(r, "near_duplicate")            # an exact leak is not reported twice


def test_instruction_templates_conflicts_and_prompt_overflow():
    rng = np.random.default_rng(3)
    prompts = [f"Question: {words(rng, 8)}" for _ in range(12)]
    prompts[4] = "### Instruction:\n" + words(rng, 8)
    prompts[9] = "### Instruction:\n" + words(rng, 8)
    responses = [words(rng, 5) for _ in range(12)]
    prompts[11], responses[11] = prompts[0], "another answer"          # the same prompt, another response
    splits = {"train": ds(prompt=prompts, response=responses)}
    r = dc.check(splits, kind="instruction", tokenizer=tiny_tokenizer(), max_length=10)
    assert r["columns"] == {"prompt": "prompt", "input": None, "response": "response"}
    (mixed,) = by_check(r, "mixed_templates")
    assert (mixed["severity"], mixed["count"], mixed["signatures"]) == ("warning", 2, 2)
    assert [e["row"] for e in mixed["examples"]] == [4, 9]
    assert "'### Instruction:'" in mixed["examples"][0]["signature"]
    assert r["templates"]["signatures"][0]["count"] == 10
    (conflict,) = by_check(r, "conflict")
    assert (conflict["severity"], conflict["count"], conflict["examples"][0]["rows"]) == ("info", 1, [0, 11])
    # ChatML: "<|im_start|>user\n" + 9 words + "<|im_end|>\n<|im_start|>assistant\n" is 10 words: prompts fill max_length
    (full,) = by_check(r, "prompt_too_long")
    assert full["count"] == 12
    assert by_check(r, "too_long")[0]["count"] == 12


def test_chat_messages_roles_empty_and_malformed():
    def conv(user, reply, system=None):
        msgs = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": user}, {"role": "assistant", "content": reply}]
        return json.dumps(msgs)

    rng = np.random.default_rng(4)
    rows = [conv(words(rng, 6), words(rng, 4)) for _ in range(8)]
    rows[2] = conv(words(rng, 6), words(rng, 4), system="be brief")      # another role sequence
    rows[5] = conv(words(rng, 6), "  ")                                  # empty reply
    rows[6] = json.dumps([{"role": "user", "content": "hello"}])          # no assistant turn
    r = dc.check({"train": ds(messages=rows)}, kind="instruction")
    assert r["columns"] == {"messages": "messages"}
    (bad,) = by_check(r, "malformed")
    assert (bad["severity"], bad["count"], bad["examples"][0]["row"]) == ("error", 1, 6)
    assert bad["examples"][0]["why"] == "no assistant message"
    (empty,) = by_check(r, "empty")
    assert (empty["count"], empty["examples"][0]["row"], empty["fields"]) == (1, 5, {"message 1 (assistant)": 1})
    (mixed,) = by_check(r, "mixed_templates")
    assert {e["row"] for e in mixed["examples"]} >= {2}
    assert any("roles=system,(user,assistant)+" in e["signature"] for e in mixed["examples"])


def test_columns_are_detected_as_training_does_and_errors_name_them():
    from jlora.cli.tasks_lm import _PAIRS

    assert dc.PAIRS == _PAIRS
    assert dc.detect_columns(["instruction", "input", "output"], "instruction") == {
        "prompt": "instruction", "input": "input", "response": "output"}
    assert dc.detect_columns(["text", "id"], "instruction") == {"text": "text"}
    assert dc.detect_columns(["messages", "text"], "instruction") == {"messages": "messages"}
    assert dc.detect_columns(["review", "y"], "classification", {"text": "review", "label": "y"}) == {
        "text": "review", "label": "y"}
    with pytest.raises(ValueError, match=r"no column 'text'.*the columns are \['review', 'y'\]"):
        dc.detect_columns(["review", "y"], "classification")
    with pytest.raises(ValueError, match="found no columns to train a language model on"):
        dc.detect_columns(["a", "b"], "instruction")
    with pytest.raises(ValueError, match="kind must be one of"):
        dc.check({"train": ds(text=["x"], label=[0])}, kind="regression")
    with pytest.raises(ValueError, match="give a tokenizer"):
        dc.check({"train": ds(text=["x"], label=[0])}, kind="classification", max_length=8)


def test_minhash_recall_matches_the_exact_jaccard():
    """A few hundred pairs (40-200 words) with 0-5 random word substitutions: LSH must find (nearly) every pair whose
    exact Jaccard reaches the threshold, and only those."""
    rng = np.random.default_rng(5)
    base, edited = [], []
    for _ in range(300):
        w = [f"w{int(i)}" for i in rng.integers(0, 50_000, size=int(rng.integers(40, 200)))]
        e = list(w)
        for pos in rng.integers(0, len(w), size=int(rng.integers(0, 6))):
            e[pos] = f"x{int(rng.integers(0, 50_000))}"
        base.append(" ".join(w))
        edited.append(" ".join(e))
    hashes, counts = dc.shingle_hashes(base + edited)
    sets = np.split(hashes, np.cumsum(counts)[:-1])
    exact = [len(np.intersect1d(sets[i], sets[300 + i])) / len(np.union1d(sets[i], sets[300 + i])) for i in range(300)]
    for threshold in (0.9, 0.7):
        truth = {i for i, j in enumerate(exact) if j >= threshold}
        assert 60 < len(truth) < 300
        found, stats = dc.near_duplicates(base + edited, [0] * 300 + [1] * 300, threshold)
        got = {i for i, j, _ in found}
        assert all(j == i + 300 for i, j, _ in found)             # no unrelated pair
        assert got <= truth                                      # every pair reported is confirmed exactly
        assert len(got) >= 0.97 * len(truth), (threshold, len(got), len(truth), stats)
        for i, j, sim in found:
            assert sim == pytest.approx(exact[i])


def test_a_mid_text_substitution_needs_a_lower_threshold_and_templates_are_not_content():
    rng = np.random.default_rng(6)
    a = words(rng, 40).split()
    b = list(a)
    b[20] = "changed"                                            # 5 of 36 shingles change: Jaccard 31 / 41
    pair = [" ".join(a), " ".join(b)]
    assert dc.near_duplicates(pair, ["train", "test"], 0.9)[0] == []
    (found,) = dc.near_duplicates(pair, ["train", "test"], 0.7)[0]
    assert found[2] == pytest.approx(31 / 41)
    # one long task definition in every row (natural_instructions): short distinct inputs are not alike
    definition = words(rng, 60)
    texts = [f"{definition}\n\n{words(rng, 6)}" for _ in range(40)]
    found, stats = dc.near_duplicates(texts, [i % 2 for i in range(40)], 0.9)
    assert found == [] and stats["common_shingles"] >= 56


def test_rotten_tomatoes_as_bundled():
    """The loader already drops the source's exact repeats; what is left is one case variant
    ('abysmally pathetic') and one review quoted with and without a leading quote mark."""
    from jlora import data as jdata

    r = dc.check(jdata.rotten_tomatoes(), kind="classification")
    assert sum(s["rows"] for s in r["splits"].values()) == 12_752
    assert r["summary"]["error"] == 0
    (dup,) = by_check(r, "duplicate")
    assert (dup["split"], dup["count"]) == ("train", 1) and dup["examples"][0]["excerpt"].lower() == "abysmally pathetic"
    assert [p["count"] for p in by_check(r, "near_duplicate")] == [1]
    counts = r["label_balance"]["splits"]
    assert sum(c["counts"]["fresh"] for c in counts.values()) == 7_368
    assert sum(c["counts"]["rotten"] for c in counts.values()) == 5_384


# --------------------------------------------------------------------------------------------
# the command line

def run_cli(argv, capsys):
    from jlora.cli import data_check

    parser = argparse.ArgumentParser(prog="jlora")
    data_check.add_parser(parser.add_subparsers(dest="command", required=True))
    code = data_check.main(parser.parse_args(["data", "check", *argv]))
    return code, capsys.readouterr().out


def test_cli_on_csv_files_writes_the_report_and_strict_fails_on_errors(tmp_path, capsys):
    rng = np.random.default_rng(7)
    train = [{"review": words(rng, 10), "y": ["pos", "neg"][i % 2]} for i in range(20)]
    test = [{"review": words(rng, 10), "y": ["pos", "neg"][i % 2]} for i in range(4)]
    val = [{"review": words(rng, 10), "y": ["pos", "neg"][i % 2]} for i in range(4)]
    test[2]["review"] = train[13]["review"]                  # a test row that is a training row
    for name, rows in (("train", train), ("test", test), ("val", val)):
        pd.DataFrame(rows).to_csv(tmp_path / f"{name}.csv", index=False)
    files = [str(tmp_path / "train.csv"), "--validation-file", str(tmp_path / "val.csv"), "--test-file",
             str(tmp_path / "test.csv"), "--text-column", "review", "--label-column", "y"]
    out = tmp_path / "report"
    code, printed = run_cli([*files, "--out", str(out), "--strict"], capsys)
    assert code == 1
    assert "**error** `leakage` (train / test): 1 test rows" in printed and "test row 2" in printed
    assert {p.name for p in out.iterdir()} == {"data_check.json", "data_check.md", "token_lengths.png"}
    report = json.loads((out / "data_check.json").read_text())
    assert report["data"] == str(tmp_path / "train.csv") and report["model"] == "minilm"
    assert report["kind"] == "classification" and report["unit"] == "tokens" and report["max_length"] == 48
    assert (out / "data_check.md").read_text() == printed
    assert (out / "token_lengths.png").read_bytes()[:4] == b"\x89PNG"

    test[2]["review"] = words(rng, 10)
    pd.DataFrame(test).to_csv(tmp_path / "test.csv", index=False)
    code, printed = run_cli([*files, "--strict", "--json"], capsys)
    assert code == 0 and json.loads(printed)["summary"]["error"] == 0


def test_cli_on_chat_and_prompt_response_files(tmp_path, capsys):
    rng = np.random.default_rng(8)
    rows = [{"messages": [{"role": "user", "content": words(rng, 6)}, {"role": "assistant", "content": words(rng, 3)}]}
            for _ in range(30)]
    rows[4]["messages"][1]["content"] = ""
    pd.DataFrame(rows).to_json(tmp_path / "chat.jsonl", orient="records", lines=True)
    code, printed = run_cli([str(tmp_path / "chat.jsonl"), "--json", "--strict"], capsys)
    r = json.loads(printed)
    assert code == 1 and r["kind"] == "instruction" and r["columns"] == {"messages": "messages"}
    assert r["model"].startswith("smollm2") and r["unit"] == "tokens"
    (empty,) = by_check(r, "empty")
    assert empty["count"] == 1

    pairs = [{"question": f"Question: {words(rng, 6)}", "answer": words(rng, 3)} for _ in range(30)]
    pd.DataFrame(pairs).to_csv(tmp_path / "qa.csv", index=False)
    code, printed = run_cli([str(tmp_path / "qa.csv"), "--model", "none"], capsys)
    assert code == 0 and "No problems found." in printed and "## Lengths (characters)" in printed


@pytest.mark.parametrize("argv, message", [
    (["imdb"], "data 'imdb' is neither a bundled set"),
    (["rotten_tomatoes", "--kind", "instruction"], "'rotten_tomatoes' is classification data; --kind instruction"),
    (["rotten_tomatoes", "--text-column", "x"], "--text-column apply to a data file"),
    (["chatterbot", "--model", "minilm"], "--model minilm is an encoder"),
    (["rotten_tomatoes", "--near-dup-threshold", "1.5"], r"--near-dup-threshold must be in \(0, 1\], got 1.5"),
    (["rotten_tomatoes", "--model", "none", "--max-length", "10"], "--max-length counts tokens"),
    (["no/such/file.csv"], "data file no/such/file.csv does not exist"),
])
def test_cli_bad_input_names_the_value(argv, message, capsys):
    with pytest.raises(SystemExit, match=message) as e:
        run_cli(argv, capsys)
    assert str(e.value).startswith("jlora: ")


def test_cli_missing_column_lists_the_columns(tmp_path, capsys):
    pd.DataFrame({"review": [f"row {i}" for i in range(20)], "label": [0, 1] * 10}).to_csv(tmp_path / "d.csv", index=False)
    with pytest.raises(SystemExit, match=r"no column 'text'.*'review'"):
        run_cli([str(tmp_path / "d.csv"), "--model", "none"], capsys)


def test_bundled_splits_keep_case_and_punctuation_variants_together():
    """`jlora data check` found "Why?" (validation) and "why?" (train) in ChatterBot, and one BBC
    article in train and validation differing by a paragraph break: the splits now group by
    split_key, and the check finds no exact leakage in either."""
    from jlora.data import bbc_news, instruction_data
    from jlora.data.text import split_key

    assert split_key("  Why? ") == split_key("why") == "why" and split_key("A\n\nB.") == "a b"
    for splits, kind in ((instruction_data("chatterbot"), "instruction"), (bbc_news(), "classification")):
        result = dc.check(dict(splits), kind=kind)
        assert not [p for p in result["problems"] if p["check"] == "leakage"], kind
