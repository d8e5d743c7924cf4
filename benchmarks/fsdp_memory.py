"""Per-device memory of jlora's sharded LoRA / QLoRA step as devices are added, read from the
compiler (``step.memory``: XLA's memory analysis of the compiled program), with jlora's batch
constraints in the model (``jlora.distributed.constrain_batch``) and, in the same run, without
them (the hook replaced by the identity), on meshes (1,), (8,) data, (2,4) data x fsdp and (1,8)
fsdp. jlora's Llama (scan_layers, remat), the model's own partition rules, global batch fixed.

    .venv/bin/python benchmarks/fsdp_memory.py --out benchmarks/results/fsdp_memory_cpu.json

Runs on fake CPU devices (set here); on a machine with 8 accelerators it measures those.
"""

import argparse
import os
import sys

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import json  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import jlora  # noqa: E402
import jlora.models.llama as llama  # noqa: E402
from jlora.distributed import make_mesh, resolve_rules  # noqa: E402
from jlora.train import make_step  # noqa: E402

MESHES = (((1,), ("data",)), ((8,), ("data",)), ((2, 4), ("data", "fsdp")), ((1, 8), ("data", "fsdp")))
TARGETS = r".*(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)/kernel"


def measure(config, method, batch, seq, rank, constrained):
    original = llama.constrain_batch
    if not constrained:
        llama.constrain_batch = lambda x: x
    try:
        model = llama.LlamaForCausalLM(config)
        params = model.init_params(jax.random.key(0))
        spec = (jlora.QLoRA(rank=rank, alpha=2 * rank, targets=TARGETS, quant="nf4", double_quant=True)
                if method == "qlora" else jlora.LoRA(rank=rank, alpha=2 * rank, targets=TARGETS))
        adapted = jlora.apply(params, spec, key=jax.random.key(1), model=model.apply,
                              example=(jnp.zeros((1, 8), jnp.int32),))
        trainable, frozen = jlora.partition(adapted)
        forward = jlora.lift(model.apply)

        def loss_fn(p, b, key):
            logits = forward(p, b["input_ids"]).astype(jnp.float32)
            logp = jax.nn.log_softmax(logits[:, :-1])
            return -jnp.mean(jnp.take_along_axis(logp, b["input_ids"][:, 1:, None], axis=-1))

        out = {}
        for shape, names in MESHES:
            mesh = make_mesh(shape, names, devices=jax.devices()[:int(jnp.prod(jnp.array(shape)))])
            rules = resolve_rules(config.partition_rules(), mesh)
            step = make_step(loss_fn, optax.adamw(1e-4), mesh=mesh, rules=rules, batch_axes=names)
            opt_state = jax.eval_shape(step.init, trainable)
            b = {"input_ids": jax.ShapeDtypeStruct((batch, seq), jnp.int32)}
            out["x".join(map(str, shape))] = step.memory(trainable, frozen, opt_state, b, jax.random.key(0))
        return out
    finally:
        llama.constrain_batch = original


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--methods", default="lora,qlora")
    p.add_argument("--out")
    a = p.parse_args(argv)
    if len(jax.devices()) < 8:
        sys.exit(f"needs 8 devices, have {len(jax.devices())}")
    config = llama.LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.hidden * 11 // 4,
                               num_hidden_layers=a.layers, num_attention_heads=max(a.hidden // 64, 1),
                               num_key_value_heads=max(a.hidden // 256, 1), scan_layers=True, remat=True)
    t0 = time.perf_counter()
    rows = []
    for method in a.methods.split(","):
        with_hook = measure(config, method, a.batch, a.seq, a.rank, True)
        without = measure(config, method, a.batch, a.seq, a.rank, False)
        for mesh in with_hook:
            rows.append({"method": method, "mesh": mesh, "temp_bytes": with_hook[mesh]["temp"],
                         "temp_bytes_without_constraints": without[mesh]["temp"],
                         "argument_bytes": with_hook[mesh]["argument"], "peak_bytes": with_hook[mesh]["peak"],
                         "peak_bytes_without_constraints": without[mesh]["peak"]})
    result = {"benchmark": "fsdp_memory", "what": "compiled per-device bytes of one training step (XLA memory analysis)",
              "config": {"hidden": a.hidden, "layers": a.layers, "vocab": a.vocab, "batch": a.batch, "seq": a.seq,
                         "rank": a.rank, "scan_layers": True, "remat": True},
              "machine": {"backend": jax.default_backend(), "devices": f"{len(jax.devices())} x {jax.devices()[0].device_kind}",
                          "cpu": platform.processor() or platform.machine(), "jax": jax.__version__},
              "rows": rows, "wall_s": time.perf_counter() - t0}
    text = json.dumps(result, indent=1)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
