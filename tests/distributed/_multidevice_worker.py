"""Run by tests/distributed/test_sharding.py in a fresh interpreter with 8 fake CPU devices
(XLA_FLAGS must be set before jax is imported). Prints one JSON line of results."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import json  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jlora  # noqa: E402
from jlora.core.nodes import is_adapter_leaf  # noqa: E402
from jlora.distributed import batch_shardings, make_mesh, shard, shardings_for  # noqa: E402
from jlora.train import init_opt_state, make_step  # noqa: E402

D = 16


class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm()(x)
        q = nn.Dense(D, name="query")(h)
        k = nn.Dense(D, name="key")(h)
        v = nn.Dense(D, name="value")(h)
        att = jax.nn.softmax(jnp.einsum("btd,bsd->bts", q, k) / np.sqrt(D), axis=-1)
        x = x + nn.Dense(D, name="out")(jnp.einsum("bts,bsd->btd", att, v))
        h = nn.LayerNorm()(x)
        return x + nn.Dense(D, name="down")(nn.gelu(nn.Dense(4 * D, name="up")(h)))


class Model(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(D, name="embed")(x)
        x = Block(name="block_0")(x)
        x = Block(name="block_1")(x)
        return nn.Dense(4, name="head")(x)


RULES = [(r"up/kernel$", P(None, "fsdp")), (r"kernel$", P("fsdp", None))]


def norm(spec, ndim):
    t = tuple(spec)
    return list(t + (None,) * (ndim - len(t)))


def main():
    out = {"n_devices": len(jax.devices())}
    mesh = make_mesh((2, 4), ("data", "fsdp"))
    model = Model()
    x = jax.random.normal(jax.random.key(1), (16, 6, 8))
    y = jax.random.normal(jax.random.key(2), (16, 6, 4))
    params = model.init(jax.random.key(0), x)["params"]
    adapted = jlora.apply(params, jlora.LoRA(rank=4, alpha=8, targets=r".*kernel"), key=jax.random.key(3))
    trainable, frozen = jlora.partition(adapted)
    # non-zero B so that every factor gets a gradient on the first step
    trainable = jax.tree_util.tree_map(
        lambda l: l.with_(b={n: 0.05 * jax.random.normal(jax.random.key(5), v.shape) for n, v in l.b.items()})
        if jlora.is_node(l) else l, trainable, is_leaf=is_adapter_leaf)
    forward = jlora.lift(model.apply)

    def loss_fn(p, batch, key):
        pred = forward({"params": p}, batch["x"])
        return jnp.mean((pred - batch["y"]) ** 2), {"pred_mean": jnp.mean(pred)}

    optimizer = optax.sgd(0.1, momentum=0.9)
    batch = {"x": x, "y": y}
    copy = lambda t: jax.tree_util.tree_map(lambda v: jnp.array(v, copy=True), t)

    # single-device reference
    ref_step = make_step(loss_fn, optimizer, accum_steps=2)
    t_ref, o_ref = copy(trainable), optimizer.init(copy(trainable))
    ref_losses = []
    for i in range(2):
        t_ref, o_ref, m = ref_step(t_ref, frozen, o_ref, batch, jax.random.key(i))
        ref_losses.append(float(m["loss"]))

    # dp x fsdp
    step = make_step(loss_fn, optimizer, accum_steps=2, mesh=mesh, rules=RULES, batch_axes=("data", "fsdp"))
    frozen_sh = shard(frozen, mesh, RULES)
    t_sh = shard(copy(trainable), mesh, RULES)
    o_sh = init_opt_state(optimizer, t_sh, mesh=mesh, rules=RULES)
    losses = []
    for i in range(2):
        t_sh, o_sh, m = step(t_sh, frozen_sh, o_sh, batch, jax.random.key(i))
        losses.append(float(m["loss"]))
    out["ref_losses"], out["losses"] = ref_losses, losses
    flat_ref = jax.tree_util.tree_leaves(t_ref)
    flat_sh = jax.tree_util.tree_leaves(t_sh)
    out["n_leaves"] = [len(flat_ref), len(flat_sh)]
    out["max_param_diff"] = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in zip(flat_ref, flat_sh))
    out["moved"] = float(max(np.max(np.abs(np.asarray(a) - np.asarray(b)))
                             for a, b in zip(flat_ref, jax.tree_util.tree_leaves(trainable))))
    out["max_opt_diff"] = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                              for a, b in zip(jax.tree_util.tree_leaves(o_ref), jax.tree_util.tree_leaves(o_sh)))
    out["frozen_equal"] = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
                              zip(jax.tree_util.tree_leaves(frozen), jax.tree_util.tree_leaves(frozen_sh)))

    # the shardings the outputs actually carry
    def describe(node, opt=False):
        a, b = node.a["default"], node.b["default"]
        d = {"a_spec": norm(a.sharding.spec, a.ndim), "b_spec": norm(b.sharding.spec, b.ndim),
             "a_shard": list(a.addressable_shards[0].data.shape), "b_shard": list(b.addressable_shards[0].data.shape),
             "a_shape": list(a.shape), "b_shape": list(b.shape)}
        return d

    blk = t_sh["block_0"]
    out["query"] = describe(blk["query"]["kernel"])
    out["up"] = describe(blk["up"]["kernel"])
    out["opt_query"] = describe(o_sh[0].trace["block_0"]["query"]["kernel"])
    base = frozen_sh["block_0"]["up"]["kernel"].base
    out["up_base"] = {"spec": norm(base.sharding.spec, base.ndim), "shard": list(base.addressable_shards[0].data.shape)}

    # errors that need a mesh axis larger than 1
    odd = {"w": {"kernel": jnp.ones((10, 8))}}
    try:
        shardings_for(odd, mesh, [(r"kernel$", P("fsdp", None))])
        out["indivisible_error"] = None
    except ValueError as e:
        out["indivisible_error"] = str(e)
    try:
        batch_shardings({"x": jnp.ones((6, 3))}, mesh, ("data", "fsdp"))
        out["batch_error"] = None
    except ValueError as e:
        out["batch_error"] = str(e)
    odd_adapted = jlora.apply({"w": {"kernel": jnp.ones((8, 6))}}, jlora.LoRA(rank=2, targets=r".*kernel"))
    try:
        shardings_for(jlora.partition(odd_adapted)[0], mesh, [(r"kernel$", P(None, "fsdp"))])
        out["indivisible_node_error"] = None
    except ValueError as e:
        out["indivisible_node_error"] = str(e)
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main()
