"""jlora's layers, enforced by walking the import graph of the source (no import is executed).

    quant  <-  core  <-  methods, distributed  <-  io, train  <-  models, data, assets, planner  <-  cli

A module may import (at module level) jlora modules of its own layer or a lower one, never a
higher one. Imports inside functions are allowed only for the third-party packages of the optional
extras (``jlora[models]``, ``jlora[data]``, ``jlora[cli]``): a function-level import of a jlora
module or of a core dependency hides a layering problem or a cycle. Everything up to ``io`` /
``train`` imports only jlora's core dependencies, which are exactly pyproject.toml's
``dependencies``; ``import jlora`` and a whole apply / lift / train / save pulls no extra.
"""

import ast
import pathlib
import subprocess
import sys
import textwrap
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "jlora"

#: module prefix -> layer (the longest matching prefix wins)
LAYERS = {
    "jlora._version": 0,
    "jlora.quant": 0,
    "jlora.core": 1,
    "jlora.methods": 2,
    "jlora.distributed": 2,
    "jlora.io": 3,
    "jlora.train": 3,
    "jlora.models": 4,
    "jlora.data": 4,
    "jlora.assets": 4,
    "jlora.planner": 4,   # the memory planner: jlora's Llama + the training step
    "jlora.eval": 4,      # jlora evaluate's library: metrics, forgetting (data + models), review sheets
    "jlora.cli": 5,
    "jlora.cli.tasks": 5,
    "jlora.cli.tasks_lm": 5,
    "jlora": 2,   # the package root re-exports core and methods (io, train, ... load lazily)
}
LAYER_NAMES = ["quant", "core", "methods / distributed", "io / train", "models / data / assets / planner", "cli"]

#: import names of jlora's core dependencies (pyproject.toml ``dependencies``) and what they bring
CORE_MODULES = {"jax", "jaxlib", "flax", "optax", "orbax", "chex", "numpy", "safetensors", "ml_dtypes"}
CORE_DISTRIBUTIONS = {"jax", "flax", "optax", "orbax-checkpoint", "chex", "numpy", "safetensors"}
#: import names of the optional extras' packages
EXTRA_MODULES = {"datasets", "pandas", "tokenizers", "gguf", "yaml", "matplotlib", "tqdm", "tensorboardX",
                 "jinja2", "PIL", "sacrebleu", "rouge_score", "scipy"}


def _module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _layer(module: str) -> int:
    best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return LAYERS[best]


def _imports(tree):
    """``(node, imported module, inside_function)`` for every import statement."""
    out = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                out.extend((child, alias.name, in_function) for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and not child.level:
                if child.module == "jlora":   # `from jlora import assets` imports the submodule
                    out.extend((child, f"jlora.{a.name}" if (PACKAGE / a.name).exists()
                                or (PACKAGE / f"{a.name}.py").exists() else "jlora", in_function)
                               for a in child.names)
                else:
                    out.extend((child, f"{child.module}.{a.name}"
                                if (ROOT / child.module.replace(".", "/") / f"{a.name}.py").exists() else child.module,
                                in_function) for a in child.names)
            visit(child, inner)

    visit(tree, False)
    return out


def _sources():
    return [(p, _module_name(p), ast.parse(p.read_text(), str(p))) for p in sorted(PACKAGE.rglob("*.py"))]


SOURCES = _sources()


def test_imports_follow_the_layers():
    bad = []
    for path, module, tree in SOURCES:
        for node, target, _ in _imports(tree):
            if target.split(".")[0] != "jlora" or target == "jlora":
                continue
            if _layer(target) > _layer(module):
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno} {module} ({LAYER_NAMES[_layer(module)]}) imports "
                           f"{target} ({LAYER_NAMES[_layer(target)]})")
    assert not bad, "imports against the layer order:\n" + "\n".join(bad)


def test_function_level_imports_are_optional_extras_only():
    bad = []
    for path, module, tree in SOURCES:
        for node, target, in_function in _imports(tree):
            if in_function and target.split(".")[0] not in EXTRA_MODULES:
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {target} inside a function")
    assert not bad, ("move these imports to module level (only the optional extras' packages may be imported "
                     "lazily):\n" + "\n".join(bad))


def test_library_layers_need_only_the_core_dependencies():
    bad = []
    for path, module, tree in SOURCES:
        if _layer(module) > 3:
            continue
        for node, target, in_function in _imports(tree):
            top = target.split(".")[0]
            if in_function or top in ("jlora", "__future__") or top in sys.stdlib_module_names:
                continue
            if top not in CORE_MODULES:
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {target} at module level")
    assert not bad, "library layers importing packages outside the core dependencies:\n" + "\n".join(bad)


def test_pyproject_core_dependencies_are_the_transform_library_s_only():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {dep.split(">")[0].split("<")[0].split("=")[0].split("[")[0].strip().lower()
             for dep in project["dependencies"]}
    assert names == CORE_DISTRIBUTIONS
    extras = project["optional-dependencies"]
    for extra in ("models", "data", "cli", "all"):
        assert extra in extras, f"pyproject.toml has no [{extra}] extra"
    name = lambda d: d.split(">")[0].split("<")[0].split("=")[0].strip().lower()
    everything = {name(d) for d in extras["all"]}
    for extra in ("models", "data", "cli"):
        assert {name(d) for d in extras[extra]} <= everything, f"[all] lacks part of [{extra}]"


def test_a_lora_run_imports_no_extra():
    """apply, lift, one training step and save_adapter on a Flax model, in a fresh interpreter: no
    package of the optional extras is imported."""
    script = textwrap.dedent("""
        import sys, tempfile, os
        import flax.linen as nn, jax, jax.numpy as jnp, optax
        import jlora, jlora.io, jlora.train
        model = nn.Sequential([nn.Dense(16), nn.relu, nn.Dense(4)])
        x = jnp.ones((8, 12))
        params = model.init(jax.random.key(0), x)
        spec = jlora.LoRA(rank=2, targets=r".*/kernel")
        adapted = jlora.apply(params, spec, key=jax.random.key(1))
        trainable, frozen = jlora.partition(adapted)
        forward = jlora.lift(model.apply)
        loss_fn = lambda p, batch, key: jnp.mean((forward(p, batch[0]) - batch[1]) ** 2)
        step = jlora.train.make_step(loss_fn, optax.adam(1e-2))
        state = step.init(trainable)
        trainable, state, metrics = step(trainable, frozen, state, (x, jnp.zeros((8, 4))), jax.random.key(2))
        out = jlora.io.save_adapter(os.path.join(tempfile.mkdtemp(), "a"), jlora.combine(trainable, frozen), spec=spec)
        assert os.path.isdir(out)
        extras = %r
        print(sorted(m for m in extras if m in sys.modules))
    """ % sorted((EXTRA_MODULES - {"yaml"}) | {"torch", "transformers"}))   # flax itself requires pyyaml
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "[]", result.stdout
