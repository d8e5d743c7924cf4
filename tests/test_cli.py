"""The jlora CLI end to end on the real MiniLM checkpoint and Rotten Tomatoes (a few steps)."""

import json

import numpy as np
import pytest

from jlora import cli


def test_config_precedence_and_validation(tmp_path):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text("rank: 4\nsteps: 7\nmax-length: 32\n")
    cfg = cli.load_config({"config": str(cfg_file), "steps": 9, "lr": None})
    assert (cfg["rank"], cfg["steps"], cfg["max_length"], cfg["lr"]) == (4, 9, 32, cli.DEFAULTS["lr"])
    (tmp_path / "bad.json").write_text(json.dumps({"rnak": 3}))
    with pytest.raises(SystemExit, match="unknown keys.*rnak"):
        cli.load_config({"config": str(tmp_path / "bad.json")})
    with pytest.raises(SystemExit, match="--rank must be a positive integer, got 0"):
        cli.load_config({"rank": 0})
    with pytest.raises(SystemExit, match="not divisible by --accum-steps 3"):
        cli.load_config({"batch": 8, "accum_steps": 3})
    with pytest.raises(SystemExit, match="does not exist"):
        cli.load_config({"config": str(tmp_path / "missing.yaml")})


def test_train_eval_export_inspect(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli.main(["train", "--steps", "3", "--batch", "4", "--max-length", "24", "--eval-limit", "24",
                     "--out", str(run), "--no-progress"]) == 0
    results = json.loads((run / "results.json").read_text())
    for name in ("config.json", "metrics.jsonl", "plot.png", "summary.txt", "adapter/jlora_adapter.json"):
        assert (run / name).exists(), name
    assert results["test"]["examples"] == 24 and 0.0 <= results["test"]["accuracy"] <= 1.0
    assert 0 < results["trainable_percent"] < 1.0
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [1, 3] and all(np.isfinite(l["loss"]) for l in lines)
    capsys.readouterr()

    assert cli.main(["eval", "--run", str(run), "--split", "test", "--limit", "24"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["accuracy"] == pytest.approx(results["test"]["accuracy"])  # reloaded adapter == trained one

    assert cli.main(["export", "--run", str(run), "--format", "merged", "--out", str(tmp_path / "merged")]) == 0
    import orbax.checkpoint as ocp
    merged = ocp.StandardCheckpointer().restore(str(tmp_path / "merged"))
    assert merged["params"]["encoder"]["layer_0"]["attention"]["self"]["query"]["kernel"].shape == (384, 384)

    assert cli.main(["export", "--run", str(run), "--format", "peft", "--out", str(tmp_path / "peft")]) == 0
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and sorted(config["target_modules"]) == ["query", "value"]
    assert "classifier" in config["modules_to_save"]
    from safetensors.numpy import load_file
    tensors = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert tensors["base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight"].shape == (8, 384)

    capsys.readouterr()
    assert cli.main(["inspect", "--run", str(run)]) == 0
    table = capsys.readouterr().out
    assert "attention/self/query/kernel" in table and "classifier/kernel" in table and "full" in table

    with pytest.raises(SystemExit, match="already holds a finished run"):
        cli.main(["train", "--steps", "1", "--out", str(run), "--no-progress"])


def test_qlora_method_builds_quantised_bases():
    from jlora.quant import QuantizedArray

    cfg = cli.load_config({"method": "qlora", "quant": "int4", "double_quant": False, "rank": 2,
                           "quantize_frozen": r".*/intermediate/dense/kernel"})
    task, adapted, spec = cli.build(cfg)
    layer = adapted["params"]["encoder"]["layer_0"]
    node = layer["attention"]["self"]["query"]["kernel"]
    assert type(spec).__name__ == "QLoRA" and isinstance(node.base, QuantizedArray) and node.base.scheme == "int4"
    frozen_q = layer["intermediate"]["dense"]["kernel"]
    assert isinstance(frozen_q.base, QuantizedArray) and frozen_q.active == ()
    assert not hasattr(layer["attention"]["self"]["key"]["kernel"], "base")  # untouched


def test_param_dtype_stores_pretrained_weights_in_bf16_but_not_the_new_head():
    import jax.numpy as jnp

    task, adapted, spec = cli.build(cli.load_config({"param_dtype": "bfloat16", "rank": 2}))
    p = adapted["params"]
    assert p["encoder"]["layer_0"]["attention"]["self"]["query"]["kernel"].base.dtype == jnp.bfloat16
    assert p["encoder"]["layer_0"]["intermediate"]["dense"]["kernel"].dtype == jnp.bfloat16
    assert p["classifier"]["kernel"].value.dtype == jnp.float32
    assert p["encoder"]["layer_0"]["attention"]["self"]["query"]["kernel"].a["default"].dtype == jnp.float32


def test_prompt_methods_train_eval_export_inspect(tmp_path, capsys):
    """--method prefix with Li & Liang's projection on the real MiniLM: the saved adapter holds the
    final per-layer keys/values (no MLP) and the head; eval on the reloaded run reproduces test."""
    run = tmp_path / "prefix"
    assert cli.main(["train", "--method", "prefix", "--virtual-tokens", "4", "--prefix-projection", "16",
                     "--steps", "3", "--batch", "4", "--max-length", "24", "--eval-limit", "24", "--lr", "1e-2",
                     "--out", str(run), "--no-progress"]) == 0
    results = json.loads((run / "results.json").read_text())
    saved = json.loads((run / "adapter" / "jlora_adapter.json").read_text())
    shapes = {t["path"]: tuple(t["shape"]) for t in saved["trainables"]}
    assert shapes == {"jlora_prompt/prefix_tuning/embedding": (4, 6, 2, 12, 32),   # MiniLM: 6 layers, 12 heads
                      "params/classifier/kernel": (384, 2), "params/classifier/bias": (2,)}
    assert saved["spec"] == {"method": "prefix_tuning", "num_virtual_tokens": 4, "projection_hidden": 16,
                             "init": "random", "init_text": None}
    # trained: embedding 4*384 + MLP (384*16 + 16 + 16*18432 + 18432) + head 770
    assert results["trainable_params"] == 4 * 384 + 384 * 16 + 16 + 16 * 6 * 2 * 384 + 6 * 2 * 384 + 770
    capsys.readouterr()
    assert cli.main(["eval", "--run", str(run), "--split", "test", "--limit", "24"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["accuracy"] == pytest.approx(results["test"]["accuracy"])
    assert evaluated["loss"] == pytest.approx(results["test"]["loss"], rel=1e-4)

    assert cli.main(["export", "--run", str(run), "--format", "merged", "--out", str(tmp_path / "merged")]) == 0
    import orbax.checkpoint as ocp
    merged = ocp.StandardCheckpointer().restore(str(tmp_path / "merged"))
    assert merged["jlora_prompt"]["prefix_tuning"]["embedding"].shape == (4, 6, 2, 12, 32)
    # PEFT prompt-learning file: the final prefix (the projection applied) and the head
    assert cli.main(["export", "--run", str(run), "--format", "peft", "--out", str(tmp_path / "peft")]) == 0
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["prefix_projection"], config["modules_to_save"]) == (
        "PREFIX_TUNING", False, ["classifier"])
    from safetensors.numpy import load_file
    assert load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))["prompt_embeddings"].shape == (4, 6 * 2 * 384)
    capsys.readouterr()
    assert cli.main(["inspect", "--run", str(run)]) == 0
    assert "jlora_prompt/prefix_tuning/embedding" in capsys.readouterr().out


def test_prompt_and_ptuning_flags_build_their_specs():
    import jax.numpy as jnp

    import jlora

    with pytest.raises(SystemExit, match="--virtual-tokens must be a positive integer, got 0"):
        cli.load_config({"method": "prompt", "virtual_tokens": 0})
    task, adapted, spec = cli.build(cli.load_config({"method": "prompt", "virtual_tokens": 5, "prompt_init": "text",
                                                     "prompt_init_text": "positive or negative?"}))
    assert spec == jlora.PromptTuning(5, init="text", init_text="positive or negative?")
    ids = task.tokenizer.encode("positive or negative?").ids                # [CLS] ... [SEP], as PEFT tokenises
    table = task.params["params"]["embeddings"]["word_embeddings"]["embedding"]
    emb = adapted["jlora_prompt"]["prompt_tuning"]["embedding"].value
    assert jnp.array_equal(emb, table[jnp.asarray((ids * 5)[:5])])
    _, adapted, spec = cli.build(cli.load_config({"method": "ptuning", "virtual_tokens": 3, "ptuning_encoder": "lstm",
                                                  "ptuning_hidden": 8}), task=task)
    assert spec == jlora.PTuning(3, encoder="lstm", hidden=8)
    assert adapted["jlora_prompt"]["p_tuning"]["lstm_head"]["l1"]["w_ih"].shape == (16, 32)
    assert jlora.prompt_kwargs(adapted, 2)["prompt_embeddings"].shape == (2, 3, 384)
    with pytest.raises(SystemExit, match="needs a non-empty init_text, got None"):
        cli.build(cli.load_config({"method": "prompt", "prompt_init": "text"}), task=task)


def test_tcur_method_train_eval_export_inspect(tmp_path, capsys):
    """--method tcur on the real MiniLM with fisher selection calibrated on training batches: the
    saved run reproduces its test metrics, merges, refuses PEFT files and shows its tensors."""
    run = tmp_path / "tcur"
    assert cli.main(["train", "--method", "tcur", "--rank", "2", "--selection", "fisher", "--calib-batches", "1",
                     "--tcur-scale", "5", "--steps", "2", "--batch", "4", "--max-length", "16", "--eval-limit", "16",
                     "--out", str(run), "--no-progress"]) == 0
    results = json.loads((run / "results.json").read_text())
    saved = json.loads((run / "adapter" / "jlora_adapter.json").read_text())
    assert saved["spec"]["method"] == "tcur" and saved["spec"]["selection"] == "fisher"
    assert saved["spec"]["scale"] == 5.0 and saved["spec"]["rank"] == 2
    # cores: n3 * r^2 per tensor (attention 24 slices, mlp up / down 6 each) + the 384 x 2 head
    assert results["trainable_params"] == (24 + 6 + 6) * 2 ** 2 + 770
    capsys.readouterr()
    assert cli.main(["eval", "--run", str(run), "--split", "test", "--limit", "16"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["loss"] == pytest.approx(results["test"]["loss"], rel=1e-5)
    assert cli.main(["export", "--run", str(run), "--format", "merged", "--out", str(tmp_path / "merged")]) == 0
    import orbax.checkpoint as ocp
    merged = ocp.StandardCheckpointer().restore(str(tmp_path / "merged"))
    assert "jlora_tcur" not in merged
    assert merged["params"]["encoder"]["layer_5"]["output"]["dense"]["kernel"].shape == (1536, 384)
    with pytest.raises((SystemExit, ValueError), match="tcur"):
        cli.main(["export", "--run", str(run), "--format", "peft", "--out", str(tmp_path / "peft")])
    capsys.readouterr()
    assert cli.main(["inspect", "--run", str(run)]) == 0
    out = capsys.readouterr().out
    assert "attention: 24 kernels stacked, n3=24" in out and "selection=fisher" in out
    with pytest.raises(SystemExit, match="--tcur-scale must be a positive number, got 0"):
        cli.load_config({"method": "tcur", "tcur_scale": 0})
    with pytest.raises(SystemExit, match="--budget must be a positive integer"):
        cli.load_config({"method": "tcur", "budget": -3})


def test_a_diverging_run_exits_nonzero_and_saves_no_adapter(tmp_path):
    run = tmp_path / "wild"
    with pytest.raises(SystemExit, match=r"training stopped, no adapter saved: .*(diverged|consecutive steps)"):
        cli.main(["train", "--steps", "30", "--batch", "4", "--max-length", "16", "--eval-limit", "8",
                  "--lr", "1e6", "--out", str(run), "--no-progress"])
    assert not (run / "adapter").exists() and not (run / "results.json").exists()
    records = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert records and records[0]["step"] == 1
