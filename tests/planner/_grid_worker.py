"""Runs jlora.estimate(..., compile=True) over a grid on 8 fake CPU devices and writes the analytic
and compiled figures as JSON (argv[1]); test_planner.py checks their agreement. A separate
process because the device count is fixed when JAX starts."""

import json
import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import jlora  # noqa: E402
from jlora import planner  # noqa: E402
from jlora.models.llama import LlamaConfig  # noqa: E402

#: a Llama proportioned like the real ones (head 64, GQA 4:1, SwiGLU 2.75x, 32k vocab), 4 layers
SMALL = LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                    num_attention_heads=8, num_key_value_heads=2)
T = planner.ALL_LINEAR


def spec(method, rank):
    cls = {"lora": jlora.LoRA, "qlora": jlora.QLoRA, "dora": jlora.DoRA}[method]
    return cls(rank=rank, alpha=2.0 * rank, targets=T)


#: (model, method, rank, batch, seq, remat, mesh)
GRID = [
    ("smollm2-135m", "qlora", 16, 8, 256, True, "data=2,fsdp=4"),
    ("smollm2-135m", "dora", 8, 2, 256, False, None),
    (SMALL, "dora", 16, 8, 512, True, "fsdp=4,tensor=2"),
    ("llama-3.1-8b", "qlora", 16, 8, 256, True, "fsdp=8"),
]


def main(out):
    rows = []
    for model, method, rank, batch, seq, remat, mesh in GRID:
        e = planner.estimate(model, spec(method, rank), batch=batch, seq=seq, remat=remat, mesh=mesh, compile=True)
        args = sum(e.parts[k] for k in ("frozen weights", "adapter (trainable)", "optimizer state", "batch"))
        rows.append({"model": e.model, "method": method, "rank": rank, "batch": batch, "seq": seq, "remat": remat,
                     "mesh": mesh, "analytic": e.peak, "analytic_arguments": args, "compiled": e.compiled})
    with open(out, "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
