"""The CLI's DoRA / IA3 / AdaLoRA methods on the real MiniLM checkpoint and Rotten Tomatoes."""

import json

import pytest

from jlora import cli


def test_dora_ia3_adalora_build_their_specs():
    task, adapted, spec = cli.build(cli.load_config({"method": "dora", "rank": 2}))
    node = adapted["params"]["encoder"]["layer_0"]["attention"]["self"]["query"]["kernel"]
    assert type(spec).__name__ == "DoRA" and node.meta["default"].method == "dora"
    assert node.extra["default"]["m"].shape == (384,)

    task, adapted, spec = cli.build(cli.load_config({"method": "ia3"}), task)
    layer = adapted["params"]["encoder"]["layer_0"]
    assert type(spec).__name__ == "IA3"
    assert not layer["attention"]["self"]["key"]["kernel"].meta["default"].feedforward       # outputs scaled
    assert layer["output"]["dense"]["kernel"].meta["default"].feedforward                    # PEFT's bert table
    assert layer["output"]["dense"]["kernel"].extra["default"]["l"].shape == (1536,)
    assert not hasattr(layer["attention"]["self"]["query"]["kernel"], "meta")                # not a target

    task, adapted, spec = cli.build(cli.load_config({"method": "adalora", "init_r": 6, "target_r": 2, "steps": 20}),
                                    task)
    node = adapted["params"]["encoder"]["layer_0"]["attention"]["self"]["value"]["kernel"]
    assert type(spec).__name__ == "AdaLoRA" and (spec.init_r, spec.target_r, spec.total_steps) == (6, 2, 20)
    assert node.extra["default"]["e"].shape == (6,)
    with pytest.raises(SystemExit, match="--init-r"):
        cli.load_config({"method": "adalora", "init_r": 0})


@pytest.mark.parametrize("method,extra", [
    ("dora", []),
    ("adalora", ["--init-r", "4", "--target-r", "2", "--tinit", "1", "--tfinal", "1", "--lr", "1e-2"]),
])
def test_train_and_reload(tmp_path, capsys, method, extra):
    run = tmp_path / method
    assert cli.main(["train", "--method", method, "--steps", "4", "--batch", "4", "--max-length", "24",
                     "--eval-limit", "24", "--out", str(run), "--no-progress", *extra]) == 0
    results = json.loads((run / "results.json").read_text())
    capsys.readouterr()
    assert cli.main(["eval", "--run", str(run), "--split", "test", "--limit", "24"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["accuracy"] == pytest.approx(results["test"]["accuracy"])  # the saved adapter reproduces the run
    if method == "adalora":
        ranks = results["adalora_ranks"]
        # 12 modules (query, value x 6 layers) x 4 -> budget 12 x 2 = 24 triplets kept at the end
        assert sum(ranks.values()) == 24 and all(0 <= r <= 4 for r in ranks.values())
        lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
        assert lines[-1]["adalora_budget"] == 24
        # PEFT AdaLoRA file: the kept triplets, init_r and the schedule from the run's config
        assert cli.main(["export", "--run", str(run), "--format", "peft", "--out", str(tmp_path / "peft")]) == 0
        config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
        assert (config["peft_type"], config["init_r"], config["target_r"], config["total_step"]) == ("ADALORA", 4, 2, 4)
        from safetensors.numpy import load_file
        tensors = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
        assert sum(int((v != 0).sum()) for k, v in tensors.items() if k.endswith("lora_E")) == 24


def test_prefix_init_from_tokens_needs_a_llama():
    cfg = cli.load_config({"method": "prefix", "prefix_init": "vocab", "virtual_tokens": 4})
    assert cfg["prefix_init"] == "vocab"
    with pytest.raises(SystemExit, match="needs model= a jlora Llama"):
        cli.build(cfg)  # MiniLM is a BERT: only the Llama family computes keys/values for the init
