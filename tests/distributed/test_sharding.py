"""jlora.distributed: rule matching, inherited factor specs, validation, and an 8-device
dp x fsdp training step (run in a subprocess with fake CPU devices)."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import jlora
from jlora.distributed import (batch_shardings, make_mesh, opt_state_shardings, partition_specs,
                               shardings_for, spec_for_path)

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _params():
    return {
        "params": {
            "layers": {"attn": {"kernel": jnp.ones((3, 8, 2, 4)), "bias": jnp.ones((3, 2, 4))}},
            "mlp": {"kernel": jnp.ones((8, 16)), "bias": jnp.ones((16,))},
            "norm": {"scale": jnp.ones((8,))},
        }
    }


def _adapted():
    spec = jlora.LoRA(rank=2, targets=r".*kernel", axes={r".*attn/kernel": jlora.Axes(stack=1, inputs=1)})
    return jlora.apply(_params(), spec, key=jax.random.key(0))


RULES = [
    (r"attn/kernel$", P("layers", "fsdp", "tp", None)),
    (r"kernel$", P("fsdp", "tp")),
    (r"attn/bias$", P("layers")),
]


def test_spec_for_path_first_match_wins_and_search_semantics():
    assert spec_for_path("params/layers/attn/kernel", RULES) == P("layers", "fsdp", "tp", None)
    assert spec_for_path("params/mlp/kernel", RULES) == P("fsdp", "tp")
    assert spec_for_path("params/norm/scale", RULES) is None
    assert spec_for_path("params/mlp/kernel", [(r"^mlp", P("x"))]) is None  # re.search, anchors respected
    with pytest.raises(ValueError, match="not a valid regex"):
        spec_for_path("a", [("(", P())])
    with pytest.raises(TypeError, match="PartitionSpec"):
        spec_for_path("a", [("a", "fsdp")])


def test_factor_specs_inherit_from_the_kernel():
    specs = partition_specs(_adapted(), RULES)["params"]
    attn = specs["layers"]["attn"]["kernel"]  # (3, 8, 2, 4), stack=1, inputs=1, outputs=2
    assert attn.base == P("layers", "fsdp", "tp", None)
    assert attn.a["default"] == P("layers", "fsdp", None)  # stack + inputs + (rank,)
    assert attn.b["default"] == P("layers", None, "tp", None)  # stack + (rank,) + outputs
    mlp = specs["mlp"]["kernel"]
    assert (mlp.base, mlp.a["default"], mlp.b["default"]) == (P("fsdp", "tp"), P("fsdp", None), P(None, "tp"))
    assert specs["layers"]["attn"]["bias"] == P("layers", None, None)
    assert specs["norm"]["scale"] == P()  # unmatched -> replicated
    # a short spec is padded with None
    short = partition_specs(_adapted(), [(r"mlp/kernel$", P("tp"))])["params"]["mlp"]["kernel"]
    assert (short.base, short.a["default"], short.b["default"]) == (P("tp", None), P("tp", None), P(None, None))


def test_shardings_for_partitioned_halves_keeps_none():
    mesh = make_mesh((1, 1, 1), ("layers", "fsdp", "tp"))
    trainable, frozen = jlora.partition(_adapted())
    t_sh = shardings_for(trainable, mesh, RULES)
    f_sh = shardings_for(frozen, mesh, RULES)
    node_t = t_sh["params"]["layers"]["attn"]["kernel"]
    node_f = f_sh["params"]["layers"]["attn"]["kernel"]
    assert node_t.base is None and node_f.a["default"] is None and node_f.b["default"] is None
    assert isinstance(node_t.a["default"], NamedSharding)
    assert node_t.a["default"].spec == P("layers", "fsdp", None)
    assert node_t.b["default"].spec == P("layers", None, "tp", None)
    assert node_f.base.spec == P("layers", "fsdp", "tp", None)
    assert t_sh["params"]["mlp"]["bias"] is None and f_sh["params"]["mlp"]["bias"].spec == P()
    # same structure as the input trees, so jax.device_put / jit in_shardings accept them
    placed = jax.device_put(trainable, t_sh)
    assert jax.tree_util.tree_structure(placed) == jax.tree_util.tree_structure(trainable)
    # works on abstract trees too
    abstract = jax.eval_shape(lambda t: t, frozen)
    assert shardings_for(abstract, mesh, RULES)["params"]["mlp"]["kernel"].base.spec == P("fsdp", "tp")


def test_opt_state_shardings_follow_params():
    mesh = make_mesh((1, 1, 1), ("layers", "fsdp", "tp"))
    trainable, _ = jlora.partition(_adapted())
    t_sh = shardings_for(trainable, mesh, RULES)
    state = optax.adam(1e-3).init(trainable)
    o_sh = opt_state_shardings(state, trainable, t_sh, mesh)
    adam = o_sh[0]
    assert adam.count.spec == P()
    assert adam.mu["params"]["mlp"]["kernel"].a["default"].spec == P("fsdp", None)
    assert adam.nu["params"]["layers"]["attn"]["kernel"].b["default"].spec == P("layers", None, "tp", None)


def test_wrong_mesh_axis_is_named():
    mesh = make_mesh((1,), ("data",))
    with pytest.raises(ValueError, match=r"'params/mlp/kernel'.*\(8, 16\).*'model' is not in the mesh"):
        shardings_for(_params(), mesh, [(r"mlp/kernel$", P("model", None))])
    with pytest.raises(ValueError, match="batch axis 'fsdp' is not in the mesh"):
        batch_shardings({"x": np.ones((4, 2))}, mesh, ("data", "fsdp"))


def test_spec_longer_than_array_and_repeated_axis():
    mesh = make_mesh((1, 1), ("data", "fsdp"))
    with pytest.raises(ValueError, match=r"'params/mlp/bias'.*\(16,\).*at most one entry per axis"):
        shardings_for(_params(), mesh, [(r"mlp/bias$", P("data", "fsdp"))])
    with pytest.raises(ValueError, match="'fsdp' is used for more than one"):
        shardings_for(_params(), mesh, [(r"mlp/kernel$", P("fsdp", "fsdp"))])


def test_make_mesh_validation():
    n = len(jax.devices())
    with pytest.raises(ValueError, match=rf"needs {8 * n} devices, have {n}"):
        make_mesh((8 * n,), ("data",))
    with pytest.raises(ValueError, match="names"):
        make_mesh((1, 1), ("data",))
    mesh = make_mesh((-1,), ("data",))
    assert dict(mesh.shape) == {"data": n}


def test_multi_device_dp_fsdp_step_matches_single_device():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "distributed" / "_multidevice_worker.py")],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    assert line, proc.stdout[-2000:] + proc.stderr[-2000:]
    r = json.loads(line[-1][len("RESULT "):])
    assert r["n_devices"] == 8

    # same losses and updated params as the single-device step
    np.testing.assert_allclose(r["losses"], r["ref_losses"], rtol=1e-5)
    assert r["losses"][-1] < r["losses"][0]
    assert r["n_leaves"][0] == r["n_leaves"][1] == 28  # (2 blocks x 6 + embed + head) kernels x (a, b)
    assert r["moved"] > 1e-2  # the comparison is not vacuous
    assert r["max_param_diff"] < 1e-5 and r["max_opt_diff"] < 1e-5
    assert r["frozen_equal"]

    # factors carry the inherited shardings, physically: kernel P("fsdp", None) -> a P("fsdp", None), b replicated
    q = r["query"]
    assert q["a_spec"] == ["fsdp", None] and q["b_spec"] == [None, None]
    assert q["a_shard"] == [q["a_shape"][0] // 4, q["a_shape"][1]] and q["b_shard"] == q["b_shape"]
    # kernel P(None, "fsdp") -> a replicated, b P(None, "fsdp")
    up = r["up"]
    assert up["a_spec"] == [None, None] and up["b_spec"] == [None, "fsdp"]
    assert up["b_shard"] == [up["b_shape"][0], up["b_shape"][1] // 4] and up["a_shard"] == up["a_shape"]
    assert r["up_base"] == {"spec": [None, "fsdp"], "shard": [16, 16]}
    # optimizer moments follow their parameters
    assert r["opt_query"]["a_spec"] == ["fsdp", None] and r["opt_query"]["a_shard"] == q["a_shard"]

    # validation against real mesh sizes
    assert "'w/kernel'" in r["indivisible_error"] and "(10, 8)" in r["indivisible_error"]
    assert "P('fsdp', None)" in r["indivisible_error"] and "not divisible" in r["indivisible_error"]
    assert "leading dim 6" in r["batch_error"] and "8 devices" in r["batch_error"]
    assert "'w/kernel/b/default'" in r["indivisible_node_error"] and "(2, 6)" in r["indivisible_node_error"]


def test_nnx_state_paths_drop_value():
    from flax import nnx

    _, state = nnx.split(nnx.Linear(8, 4, rngs=nnx.Rngs(0)))
    trainable, frozen = jlora.partition(jlora.apply(state, jlora.LoRA(rank=2, targets=r".*kernel")))
    mesh = make_mesh((1,), ("fsdp",))
    rules = [(r"^kernel$", P("fsdp", None))]  # the NNX path is 'kernel', not 'kernel/value'
    t_sh, f_sh = shardings_for(trainable, mesh, rules), shardings_for(frozen, mesh, rules)
    node_t, node_f = t_sh["kernel"].get_value(), f_sh["kernel"].get_value()
    assert node_t.a["default"].spec == P("fsdp", None) and node_t.b["default"].spec == P(None, None)
    assert node_t.base is None and node_f.base.spec == P("fsdp", None) and node_f.a["default"] is None
    assert f_sh["bias"].get_value().spec == P()
    assert jax.tree_util.tree_structure(jax.device_put(frozen, f_sh)) == jax.tree_util.tree_structure(frozen)
