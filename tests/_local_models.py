"""Tiny Hugging Face checkpoints written with transformers (random weights, real tokenizers), for
tests of ``--model PATH``: a Llama directory with SmolLM2's tokenizer and chat template, and a BERT
directory with MiniLM's tokenizer."""

from __future__ import annotations

import json
import pathlib
import shutil

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def write_llama_dir(path, *, seed: int = 0, hidden: int = 32, layers: int = 2) -> pathlib.Path:
    """A 2-layer LlamaForCausalLM saved by transformers (safetensors) with SmolLM2's tokenizer.json
    and a tokenizer_config.json carrying a ChatML chat template and <|im_end|> as EOS."""
    import gguf
    import torch
    import transformers

    from jlora import assets
    from jlora.models import llama

    path = pathlib.Path(path)
    tok = llama.tokenizer_from_gguf(gguf.GGUFReader(str(assets.ensure("smollm2") / llama.SMOLLM2_GGUF)))
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=hidden, intermediate_size=2 * hidden,
                                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=256, tie_word_embeddings=True)
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": CHATML, "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|im_end|>"}))
    return path


def write_bert_dir(path, *, seed: int = 0, hidden: int = 32, layers: int = 2) -> pathlib.Path:
    """A 2-layer BertModel saved by transformers with MiniLM's tokenizer files."""
    import torch
    import transformers

    from jlora import assets

    path = pathlib.Path(path)
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=30522, hidden_size=hidden, intermediate_size=2 * hidden,
                                     num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=128)
    transformers.BertModel(config).save_pretrained(path)
    src = assets.path("minilm", "model")
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"):
        if (src / name).is_file():
            shutil.copy(src / name, path / name)
    return path
