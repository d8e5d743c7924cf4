"""A pod user's training script, run by tests/distributed/test_pod.py as one process with 8 CPU
devices or as several processes (``jax.distributed`` on 127.0.0.1, environment from the test):
jlora's Llama (scan_layers, remat), each method on the model's default rules, a few steps.

    python _pod_worker.py MODE OUT_DIR [METHODS...]

MODE ``train``: 4 steps per method on mesh (data=2, fsdp=4); writes ``OUT_DIR/<method>-p<N>.npz``
(the trained factors gathered, the losses) from process 0, and the LoRA exports. With several
processes the LoRA run saves its training state after steps 1 and 2 into ``ckpt``, and at the end
every process is SIGKILLed while a third save is under way; with one process it then writes the
compiled memory per device of the LoRA step on several meshes (``memory.json``).
MODE ``resume``: restores the newest whole state in ``ckpt`` and runs to step 4.
"""

import os
import sys

_DEVICES = int(os.environ.get("POD_LOCAL_DEVICES", "8"))
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={_DEVICES}").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import json  # noqa: E402
import signal  # noqa: E402

import jax  # noqa: E402

import jlora  # noqa: E402
from jlora.distributed import initialize  # noqa: E402

if os.environ.get("JAX_COORDINATOR_ADDRESS"):   # set by the test (or tpu_scripts/jlora-tpu local N)
    initialize()

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from jlora.core.paths import flatten_with_paths  # noqa: E402
from jlora.methods.dora import QDoRA  # noqa: E402
from jlora.data import batches  # noqa: E402
from jlora.distributed import make_mesh, place, resolve_rules, shardings_for, to_host  # noqa: E402
from jlora.io import (checkpoint_manager, load_adapter, restore_state, save_adapter, save_merged,  # noqa: E402
                      save_peft, save_state)
from jlora.models.llama import hf_module_name  # noqa: E402
from jlora.models.llama import LlamaConfig, LlamaForCausalLM  # noqa: E402
from jlora.train import make_step  # noqa: E402

CONFIG = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, scan_layers=True, remat=True)
TARGETS = r".*(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)/kernel"
SPECS = {
    "lora": lambda: jlora.LoRA(rank=4, alpha=8, targets=TARGETS),
    "qlora": lambda: jlora.QLoRA(rank=4, alpha=8, targets=TARGETS, quant="nf4", double_quant=True, block=64),
    "dora": lambda: jlora.DoRA(rank=4, alpha=8, targets=TARGETS),
    "qdora": lambda: QDoRA(rank=4, alpha=8, targets=TARGETS, quant="nf4", double_quant=True, block=64),
}
GLOBAL_BATCH, SEQ = 16, 16


def data():
    rng = np.random.default_rng(0)
    ids = rng.integers(1, CONFIG.vocab_size, size=(64, SEQ)).astype(np.int32)
    return {"input_ids": ids}


def setup(method, model):
    params = model.init_params(jax.random.key(0))
    adapted = jlora.apply(params, SPECS[method](), key=jax.random.key(1), model=model.apply,
                          example=(jnp.zeros((1, SEQ), jnp.int32),))
    # non-zero B, so every factor has a gradient from the first step
    adapted = jax.tree_util.tree_map(
        lambda l: l.with_(b={n: 0.02 * jax.random.normal(jax.random.key(7), v.shape, v.dtype) for n, v in l.b.items()})
        if jlora.is_node(l) else l, adapted, is_leaf=jlora.core.nodes.is_adapter_leaf)
    return jlora.partition(adapted)


def loss_fn_for(model):
    forward = jlora.lift(model.apply)

    def loss_fn(params, batch, key):
        ids = batch["input_ids"]
        logits = forward(params, ids).astype(jnp.float32)
        logp = jax.nn.log_softmax(logits[:, :-1])
        nll = -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
        return jnp.mean(nll)

    return loss_fn


def _mesh_and_rules():
    mesh = make_mesh((2, 4), ("data", "fsdp"))
    return mesh, resolve_rules(CONFIG.partition_rules(), mesh)


def _save_host(out_dir, name, tree, **extra):
    flat = {p: v for p, v in flatten_with_paths(to_host(tree))[0]}
    if jax.process_index() == 0:
        np.savez(os.path.join(out_dir, f"{name}.npz"), **{k.replace("/", "|"): v for k, v in flat.items()},
                 **{f"__{k}": np.asarray(v) for k, v in extra.items()})


def _steps(step, trainable, frozen, opt_state, first, last, on_step=None):
    """Steps first..last (1-based) over this process's rows; step i uses key(i) and the i-th batch."""
    losses = []
    stream = batches(data(), GLOBAL_BATCH, seed=0, epochs=None, start=first - 1)
    for i in range(first, last + 1):
        trainable, opt_state, metrics = step(trainable, frozen, opt_state, next(stream), jax.random.key(i))
        losses.append(float(metrics["loss"]))
        if on_step is not None:
            on_step(i, trainable, opt_state)
    return trainable, opt_state, losses


def train(out_dir, methods):
    """Every method 4 steps on (data=2, fsdp=4); LoRA's run also exports (adapter, merged, PEFT)."""
    model = LlamaForCausalLM(CONFIG)
    mesh, rules = _mesh_and_rules()
    tag = f"p{jax.process_count()}"
    many = jax.process_count() > 1
    manager = checkpoint_manager(os.path.join(out_dir, "ckpt"), max_to_keep=5) if many else None
    last = None
    for method in methods:
        trainable, frozen = setup(method, model)
        step = make_step(loss_fn_for(model), optax.adam(1e-2), mesh=mesh, rules=rules, batch_axes=("data", "fsdp"))
        opt_state = step.init(trainable)
        on_step = None
        if many and method == "lora":
            def on_step(i, t, o):
                if i <= 2:
                    save_state(manager, i, t, o, jax.random.key(100 + i), wait=True)
        trainable, opt_state, losses = _steps(step, trainable, frozen, opt_state, 1, 4, on_step)
        if method == "lora":
            last = (trainable, opt_state)
        _save_host(out_dir, f"{method}-{tag}", trainable, losses=losses)
        f_sh = step.shardings(trainable, frozen, opt_state, {"input_ids": np.zeros((GLOBAL_BATCH, SEQ), np.int32)})[1]
        q_base = f_sh["params"]["model"]["layers"]["self_attn"]["q_proj"]["kernel"].base
        q_spec = [list(e) if isinstance(e, tuple) else e for e in getattr(q_base, "data", q_base).spec]
        q_a = trainable["params"]["model"]["layers"]["self_attn"]["q_proj"]["kernel"].a["default"]
        if jax.process_index() == 0:
            with open(os.path.join(out_dir, f"{method}-{tag}.json"), "w") as f:
                json.dump({"losses": losses, "process_count": jax.process_count(), "devices": jax.device_count(),
                           "q_base_sharding": q_spec, "q_a_shard_shape": list(q_a.addressable_shards[0].data.shape),
                           "q_a_shape": list(q_a.shape)}, f)
        if method == "lora":   # exports of the same values (the untrained tree) placed on this mesh
            t0, f0 = setup(method, model)
            adapted = jlora.combine(place(t0, shardings_for(t0, mesh, rules)), place(f0, shardings_for(f0, mesh, rules)))
            save_adapter(os.path.join(out_dir, f"adapter-{tag}"), adapted, spec=SPECS[method]())
            save_merged(os.path.join(out_dir, f"merged-{tag}"), adapted)
            save_peft(os.path.join(out_dir, f"peft-{tag}"), adapted, hf_module_name)
            # the adapter loads back onto the sharded base with its factors split by the rules
            params = model.init_params(jax.random.key(0))
            loaded = load_adapter(os.path.join(out_dir, f"adapter-{tag}"),
                                  place(params, shardings_for(params, mesh, rules)))
            a = loaded["params"]["model"]["layers"]["self_attn"]["q_proj"]["kernel"].a["default"]
            if jax.process_index() == 0:
                with open(os.path.join(out_dir, f"loaded-{tag}.json"), "w") as f:
                    json.dump({"a_spec": [e for e in a.sharding.spec], "a_shard_shape":
                               list(a.addressable_shards[0].data.shape)}, f)
    if many:   # a third save under way when every process dies: it must never count as a checkpoint
        save_state(manager, 3, *last, jax.random.key(103), wait=False)
        print("KILLED", jax.process_index(), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    memory(out_dir, methods)


def resume(out_dir, methods):
    """Restores the newest whole training state from ``ckpt`` onto this run's mesh and processes
    and runs to step 4."""
    model = LlamaForCausalLM(CONFIG)
    mesh, rules = _mesh_and_rules()
    trainable, frozen = setup("lora", model)
    step = make_step(loss_fn_for(model), optax.adam(1e-2), mesh=mesh, rules=rules, batch_axes=("data", "fsdp"))
    trainable = place(trainable, shardings_for(trainable, mesh, rules))
    opt_state = step.init(trainable)
    manager = checkpoint_manager(os.path.join(out_dir, "ckpt"), max_to_keep=5)
    restored = restore_state(manager, trainable, opt_state, jax.random.key(0))
    assert bool(jnp.all(jax.random.key_data(restored.rng) == jax.random.key_data(jax.random.key(100 + restored.step))))
    trainable, opt_state, losses = _steps(step, restored.trainable, frozen, restored.opt_state, restored.step + 1, 4)
    _save_host(out_dir, f"resumed-p{jax.process_count()}", trainable, losses=losses, step=restored.step)


def memory(out_dir, methods):
    model = LlamaForCausalLM(CONFIG.replace(num_hidden_layers=4))
    result = {}
    for shape, names in (((1,), ("data",)), ((8,), ("data",)), ((1, 8), ("data", "fsdp"))):
        devices = jax.devices()[:int(np.prod(shape))]
        mesh = make_mesh(shape, names, devices=devices)
        rules = resolve_rules(CONFIG.partition_rules(), mesh)
        trainable, frozen = setup("lora", model)
        step = make_step(loss_fn_for(model), optax.adam(1e-2), mesh=mesh, rules=rules, batch_axes=names)
        opt_state = step.init(trainable)
        batch = {"input_ids": jnp.zeros((GLOBAL_BATCH, 64), jnp.int32)}
        stats = step.memory(trainable, frozen, opt_state, batch, jax.random.key(0))
        result["x".join(map(str, shape))] = stats
    with open(os.path.join(out_dir, "memory.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    mode, out = sys.argv[1], sys.argv[2]
    methods = sys.argv[3:] or list(SPECS)
    {"train": train, "resume": resume}[mode](out, methods)
    print("DONE", jax.process_index(), flush=True)
