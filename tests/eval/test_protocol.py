"""`jlora evaluate` end to end on tiny local checkpoints (a BERT classifier, a Llama decoder): the
report's numbers against the metrics recomputed from what it records, the forgetting check's
arithmetic, the blind review sheet and its score summary, the sealed test split, and the errors."""

import csv
import json

import numpy as np
import pytest

from jlora import cli
from jlora import eval as jeval
from jlora.cli.options import SealedSplitError
from tests._local_models import write_bert_dir, write_llama_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("evalruns")
    write_bert_dir(d / "bert_model"), write_llama_dir(d / "llama_model")
    words = ["film", "plot", "cast", "score", "story", "scene"]
    with open(d / "reviews.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["review", "sentiment"])
        for i in range(80):
            good = i % 2 == 0
            w.writerow([f"the {words[i % 6]} number {i} was " + ("wonderful and moving" if good else "dull and slow"),
                        "positive" if good else "negative"])
    with open(d / "pairs.jsonl", "w") as f:
        for i in range(40):
            f.write(json.dumps({"instruction": "Add one.", "input": str(i), "output": str(i + 1)}) + "\n")
    common = ["--no-progress", "--steps", "6", "--batch", "4"]
    assert cli.main(["train", "--model", str(d / "bert_model"), "--data", str(d / "reviews.csv"), "--text-column",
                     "review", "--label-column", "sentiment", "--max-length", "16", "--lr", "5e-3",
                     "--out", str(d / "bert"), *common]) == 0
    assert cli.main(["train", "--model", str(d / "llama_model"), "--data", str(d / "pairs.jsonl"), "--max-length", "24",
                     "--lr", "1e-2", "--out", str(d / "llama"), *common]) == 0
    return d


def test_classifier_report(runs, capsys):
    out = runs / "bert" / "evaluation"
    assert cli.main(["evaluate", "--run", str(runs / "bert"), "--review", "4", "--general-passages", "6"]) == 0
    assert "## Forgetting" in capsys.readouterr().out
    report = json.loads((out / "evaluation.json").read_text())
    results = json.loads((runs / "bert" / "results.json").read_text())
    adapted, base = report["task"]["adapted"], report["task"]["base"]
    assert adapted["examples"] == 8 and adapted["accuracy"] == pytest.approx(results["test"]["accuracy"])
    assert adapted["loss"] == pytest.approx(results["test"]["loss"], rel=1e-5)
    assert np.sum(adapted["confusion_matrix"]) == 8 and adapted["labels"] == ["negative", "positive"]
    assert (out / "confusion_adapted.png").is_file() and (out / "confusion_base.png").is_file()
    assert [v["id"] for v in report["generalisation"]["variants"]] == [
        "distractor_prefix", "distractor_suffix", "quoted", "upper_case"]
    fo = report["forgetting"]
    assert fo["passages"] == 6 and fo["drift"] == pytest.approx(1 - fo["mean_cosine"])
    assert -1 <= fo["min_cosine"] <= fo["mean_cosine"] <= 1 + 1e-6 and fo["passed"] == (fo["drift"] <= 0.10)
    assert "political_data.csv" in fo["corpus"]
    assert base["accuracy"] is not None and "per_class" in base
    sheet = (out / "review.md").read_text()
    assert sheet.count("| test-") == 4 and (out / "review.html").read_text().count("<tr data-id=") == 4


def test_forgetting_is_zero_when_nothing_changed(runs):
    cfg, task, adapted = cli._load_run(str(runs / "bert"))
    import jlora

    base = task.params
    r = jeval.forgetting.encoder_drift(task, base, base, jeval.forgetting.general_corpus(5))
    assert r["drift"] == pytest.approx(0.0, abs=1e-6) and r["similarity_rank_correlation"] == pytest.approx(1.0)
    texts = ["The committee met on Tuesday to discuss the budget.", "Rain is expected over the weekend."]
    assert jeval.forgetting.encoder_drift(task, base, jlora.merge(adapted), texts)["passages"] == 2


def test_review_scores_are_unblinded_and_summarised(runs, capsys):
    out = runs / "bert" / "evaluation"
    if not (out / "review_key.json").is_file():
        cli.main(["evaluate", "--run", str(runs / "bert"), "--review", "4", "--no-forgetting"])
    order = json.loads((out / "review_key.json").read_text())["order"]
    rows = list(csv.DictReader(open(out / "review_scores.csv")))
    assert len(rows) == 4 and {r["A"] for r in order.values()} <= {"base", "adapted"}
    filled = out / "filled.csv"
    with open(filled, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(list(rows[0].keys()))
        for r in rows:   # the adapted output always 5 on fluency, the base 2; other axes left empty
            side = {order[r["id"]]["A"]: "A", order[r["id"]]["B"]: "B"}
            vals = {f"{side['adapted']}_fluency": "5", f"{side['base']}_fluency": "2"}
            w.writerow([r["id"]] + [vals.get(c, "") for c in list(rows[0].keys())[1:]])
    assert cli.main(["evaluate", "--run", str(runs / "bert"), "--read-scores", str(filled)]) == 0
    assert "| fluency | 2.00 (4) | 5.00 (4) | 4 / 0 / 0 |" in capsys.readouterr().out
    summary = json.loads((out / "review_summary.json").read_text())
    assert summary["models"]["adapted"]["relevance"]["scored"] == 0
    # the markdown sheet filled in the same way reads the same
    md = (out / "review.md").read_text().splitlines()
    for k, line in enumerate(md):
        if line.startswith("| test-"):
            rid = line.split(" | ")[0][2:]
            cells = line.split(" | ")
            a_adapted = order[rid]["A"] == "adapted"
            cells[5], cells[8] = ("5", "2") if a_adapted else ("2", "5")
            md[k] = " | ".join(cells)
    (out / "filled.md").write_text("\n".join(md) + "\n")
    assert jeval.read_scores(out / "filled.md", out / "review_key.json")["models"]["base"]["fluency"]["mean"] == 2.0
    bad = out / "bad.csv"
    bad.write_text(f"id,A_fluency\n{rows[0]['id']},7\n")
    with pytest.raises(SystemExit, match="score 7 is outside 1-5"):
        cli.main(["evaluate", "--run", str(runs / "bert"), "--read-scores", str(bad)])
    bad.write_text("id,A_fluency\nnope,3\n")
    with pytest.raises(SystemExit, match="id 'nope' is not in the review sheet"):
        cli.main(["evaluate", "--run", str(runs / "bert"), "--read-scores", str(bad)])


def test_language_model_report(runs, tmp_path):
    probes = tmp_path / "probes.txt"
    probes.write_text("Say hello.\nWhat is 2 plus 2?\n")
    general = tmp_path / "general.txt"
    general.write_text("The river rose after three days of rain.\nShe bought bread, milk and two apples.\n")
    out = tmp_path / "ev"
    assert cli.main(["evaluate", "--run", str(runs / "llama"), "--out", str(out), "--max-new-tokens", "4",
                     "--generate-limit", "3", "--review", "2", "--probes", str(probes), "--general-text", str(general),
                     "--batch", "2"]) == 0
    report = json.loads((out / "evaluation.json").read_text())
    task = report["task"]
    assert len(report["outputs"]) == 3 and task["adapted"]["prompts_decoded"] == 3
    for name in ("base", "adapted"):   # the metrics are those of the recorded replies
        again = jeval.generation_metrics([o[name] for o in report["outputs"]], [o["references"] for o in report["outputs"]])
        for k in ("exact_match", "token_f1", "rougeL", "bleu", "chrf"):
            assert task[name][k] == pytest.approx(again[k])
        assert task[name]["perplexity"] == pytest.approx(np.exp(task[name]["loss"]), rel=1e-6)
    fo = report["forgetting"]
    assert fo["passages"] == 2 and fo["ratio"] == pytest.approx(fo["adapted_perplexity"] / fo["base_perplexity"])
    assert [p["prompt"] for p in fo["probes"]] == ["Say hello.", "What is 2 plus 2?"]
    assert fo["corpus"] == str(general) and len(report["generalisation"]["variants"]) == 4
    assert (out / "review.html").is_file()


def test_strict_fails_when_forgetting_exceeds_the_threshold(runs, tmp_path):
    # any change at all in perplexity exceeds a threshold of exactly 1.0 only if the ratio is above 1;
    # the check's verdict must follow the ratio either way
    out = tmp_path / "ev"
    rc = cli.main(["evaluate", "--run", str(runs / "llama"), "--out", str(out), "--max-new-tokens", "2",
                   "--generate-limit", "1", "--review", "0", "--general-passages", "3", "--ppl-threshold", "1.0",
                   "--strict"])
    fo = json.loads((out / "evaluation.json").read_text())["forgetting"]
    assert fo["passed"] == (fo["ratio"] <= 1.0) and rc == (0 if fo["passed"] else 1)


def test_the_test_split_is_sealed_while_training(runs, monkeypatch, tmp_path):
    _, task, adapted = cli._load_run(str(runs / "bert"))
    task.sealed = {"test"}
    import jlora

    with pytest.raises(SealedSplitError, match="sealed until training ends"):
        task.evaluate(jlora.lift(task.model.apply), adapted, "test")
    with pytest.raises(SealedSplitError):
        task.inputs("test")
    task.sealed = set()
    seen = []
    original = type(task).evaluate

    def spy(self, lifted, params, split="validation", **kw):
        seen.append((split, "test" in getattr(self, "sealed", ())))
        return original(self, lifted, params, split, **kw)

    monkeypatch.setattr(type(task), "evaluate", spy)
    cfg = cli.load_config(dict(model=str(runs / "bert_model"), data=str(runs / "reviews.csv"), text_column="review",
                               label_column="sentiment", max_length=16, steps=4, batch=4, eval_every=2,
                               best_metric="macro_f1", early_stopping=5, out=str(tmp_path / "r"), progress=False))
    cli.train(cfg, task)
    assert seen[-1] == ("test", False) and all(s == "validation" and sealed for s, sealed in seen[:-1])
    assert len(seen) == 3


def test_bad_inputs_are_named(runs, tmp_path):
    with pytest.raises(SystemExit, match="review must be an integer >= 0"):
        cli.main(["evaluate", "--run", str(runs / "bert"), "--review", "-1"])
    bad = tmp_path / "variants.json"
    bad.write_text(json.dumps({"classification": [{"id": "x", "template": "no placeholder"}]}))
    with pytest.raises(SystemExit, match="expected a string holding {input}"):
        cli.main(["evaluate", "--run", str(runs / "bert"), "--variants", str(bad), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="is also the training or validation data"):
        cli.main(["train", "--model", str(runs / "bert_model"), "--data", str(runs / "reviews.csv"),
                  "--test-file", str(runs / "reviews.csv"), "--text-column", "review", "--label-column", "sentiment"])


def test_a_language_model_run_selects_its_checkpoint_by_a_generation_metric(runs, tmp_path):
    out = tmp_path / "gen"
    assert cli.main(["train", "--model", str(runs / "llama_model"), "--data", str(runs / "pairs.jsonl"),
                     "--max-length", "24", "--steps", "4", "--batch", "4", "--eval-every", "2", "--eval-generate", "3",
                     "--eval-max-new-tokens", "3", "--best-metric", "rougeL", "--out", str(out), "--no-progress"]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval_rougeL" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert all(r["eval_prompts_decoded"] == 3 and 0 <= r["eval_token_f1"] <= 1 and "eval_chrf" in r for r in evals)
    best = json.loads((out / "results.json").read_text())["best"]
    top = max(evals, key=lambda r: (r["eval_rougeL"], -r["step"]))   # ties keep the earlier step
    assert best["metric"] == "rougeL" and best["step"] == top["step"]
    assert best["value"] == pytest.approx(top["eval_rougeL"], rel=1e-6)


def test_generation_selection_needs_decoding_and_a_language_model(runs, tmp_path):
    with pytest.raises(SystemExit, match="needs --eval-generate N"):
        cli.main(["train", "--model", str(runs / "llama_model"), "--data", str(runs / "pairs.jsonl"), "--eval-every",
                  "2", "--best-metric", "token_f1", "--out", str(tmp_path / "a")])
    with pytest.raises(SystemExit, match="this run's model is a classification model"):
        cli.main(["train", "--model", str(runs / "bert_model"), "--data", str(runs / "reviews.csv"), "--text-column",
                  "review", "--label-column", "sentiment", "--eval-every", "2", "--eval-generate", "2",
                  "--out", str(tmp_path / "b")])
    with pytest.raises(SystemExit, match="--eval-generate must be an integer >= 0, got -1"):
        cli.main(["train", "--model", str(runs / "llama_model"), "--data", str(runs / "pairs.jsonl"),
                  "--eval-generate", "-1", "--out", str(tmp_path / "c")])


def test_evaluation_refuses_splits_that_changed_since_training(runs, tmp_path):
    import shutil

    run = tmp_path / "moved"
    shutil.copytree(runs / "bert", run)
    results = json.loads((run / "results.json").read_text())
    assert set(results["data_fingerprint"]) == {"train", "validation", "test"}
    results["data_fingerprint"]["test"] = "0" * 64   # as if the file or the splitting had changed
    (run / "results.json").write_text(json.dumps(results))
    for argv in (["evaluate", "--run", str(run), "--review", "0"], ["eval", "--run", str(run)]):
        with pytest.raises(SystemExit, match=r"the test split\(s\) of .* are not the rows the run was trained"):
            cli.main(argv)
