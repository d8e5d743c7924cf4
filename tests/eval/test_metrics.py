"""The evaluation metrics against values worked by hand and against the reference libraries
(scikit-learn for classification, sacrebleu's and rouge-score's own entry points for generation)."""

import numpy as np
import pytest

from jlora.eval import metrics as M


def test_classification_metrics_by_hand():
    # true:  a a a b b c ; predicted: a b a b c c
    labels, preds = [0, 0, 0, 1, 1, 2], [0, 1, 0, 1, 2, 2]
    m = M.classification_metrics(labels, preds, ["a", "b", "c"])
    assert m["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert m["accuracy"] == pytest.approx(4 / 6)
    # a: P 2/2 R 2/3 F1 0.8 ; b: P 1/2 R 1/2 F1 0.5 ; c: P 1/2 R 1 F1 2/3
    assert m["per_class"]["a"] == pytest.approx({"precision": 1.0, "recall": 2 / 3, "f1": 0.8, "support": 3})
    assert m["per_class"]["b"]["f1"] == pytest.approx(0.5)
    assert m["per_class"]["c"]["f1"] == pytest.approx(2 / 3)
    assert m["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)


def test_a_class_never_predicted_or_absent_counts_zero():
    m = M.classification_metrics([0, 0, 1], [0, 0, 0], ["x", "y", "z"])
    assert m["per_class"]["y"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert m["per_class"]["z"]["support"] == 0 and m["macro_f1"] == pytest.approx(0.8 / 3)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_classification_metrics_match_scikit_learn(seed):
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

    rng = np.random.default_rng(seed)
    k = 5
    labels = rng.integers(0, k, 300)
    preds = np.where(rng.random(300) < 0.6, labels, rng.integers(0, k - 1, 300))   # class 4 rarely predicted
    m = M.classification_metrics(labels, preds, [f"c{i}" for i in range(k)])
    p, r, f, s = precision_recall_fscore_support(labels, preds, labels=range(k), zero_division=0)
    assert m["accuracy"] == pytest.approx(accuracy_score(labels, preds))
    assert m["macro_f1"] == pytest.approx(f1_score(labels, preds, average="macro", labels=range(k), zero_division=0))
    assert [m["per_class"][f"c{i}"]["precision"] for i in range(k)] == pytest.approx(p)
    assert [m["per_class"][f"c{i}"]["recall"] for i in range(k)] == pytest.approx(r)
    assert [m["per_class"][f"c{i}"]["support"] for i in range(k)] == list(s)
    assert m["confusion_matrix"] == confusion_matrix(labels, preds, labels=range(k)).tolist()


def test_bad_classes_are_named():
    with pytest.raises(ValueError, match=r"predictions hold class 3; expected 0\.\.2"):
        M.classification_metrics([0, 1], [0, 3], ["a", "b", "c"])
    with pytest.raises(ValueError, match="equal in length"):
        M.confusion_matrix([0, 1], [0], 2)


def test_squad_normalisation_exact_match_and_token_f1_by_hand():
    assert M.normalize_answer("The  Cat, sat!") == "cat sat"
    assert M.exact_match("Paris.", "paris") == 1.0 and M.exact_match("in Paris", "Paris") == 0.0
    # pred tokens: [cat, sat, on, mat] ; ref: [cat, sat] -> P 2/4, R 1, F1 2/3
    assert M.token_f1("the cat sat on the mat", "a cat sat") == pytest.approx(2 / 3)
    assert M.token_f1("a a b", "a b b") == pytest.approx(2 / 3)   # multiset overlap {a, b}
    assert M.token_f1("", "") == 1.0 and M.token_f1("x", "") == 0.0 and M.token_f1("x y", "z") == 0.0


def test_generation_metrics_by_hand_and_against_the_libraries():
    import sacrebleu
    from rouge_score import rouge_scorer

    preds = ["the cat sat on the mat", "Paris", "a completely different answer"]
    refs = ["the cat sat on a mat", ["London", "paris"], "the expected reply"]
    g = M.generation_metrics(preds, refs, per_example=True)
    # example 0 normalises to "cat sat on mat" on both sides (articles dropped): an exact match
    assert g["per_example"]["exact_match"] == [1.0, 1.0, 0.0] and g["exact_match"] == pytest.approx(2 / 3)
    # example 1: pred [cat sat on mat] vs ref [cat sat on mat] after normalisation: F1 1
    assert g["per_example"]["token_f1"] == pytest.approx([1.0, 1.0, 0.0])
    # ROUGE-L of example 0 by hand: tokens (lower, alnum) pred 6, ref 6, LCS "the cat sat on mat" = 5 -> F 5/6
    assert g["per_example"]["rougeL"][0] == pytest.approx(5 / 6)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    assert g["rougeL"] == pytest.approx(np.mean([scorer.score_multi([r] if isinstance(r, str) else r, p)["rougeL"].fmeasure
                                                 for p, r in zip(preds, refs)]))
    streams = [["the cat sat on a mat", "London", "the expected reply"], ["the cat sat on a mat", "paris", "the expected reply"]]
    assert g["bleu"] == pytest.approx(sacrebleu.corpus_bleu(preds, streams).score)
    assert g["chrf"] == pytest.approx(sacrebleu.corpus_chrf(preds, streams).score)
    perfect = M.generation_metrics(["a b c d e"], ["a b c d e"])
    assert perfect["bleu"] == pytest.approx(100.0) and perfect["chrf"] == pytest.approx(100.0)
    assert perfect["rougeL"] == 1.0 and "nrefs:1" in perfect["signatures"]["bleu"]


def test_generation_metrics_refuse_mismatched_inputs():
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        M.generation_metrics(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="example 0 has no reference"):
        M.generation_metrics(["a"], [[]])


def test_confusion_plot_is_written(tmp_path):
    path = M.plot_confusion([[3, 1], [0, 4]], ["neg", "pos"], str(tmp_path / "cm.png"))
    assert (tmp_path / "cm.png").stat().st_size > 1000 and path.endswith("cm.png")
