import os

# f32 matmuls at full precision so lifted-vs-merged comparisons are meaningful on every backend.
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
# The suite is dominated by XLA compile time on CPU; its backend optimisations buy little at test
# sizes (measured: ~20 % less wall time for the same tests). Subprocess tests inherit this.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
                               " --xla_llvm_disable_expensive_passes=true").strip()


def pytest_report_header(config):
    """The versions a failure most often depends on, at the top of every run."""
    from importlib import metadata

    names = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "torch", "transformers", "peft")
    found = []
    for name in names:
        try:
            found.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            found.append(f"{name} (not installed)")
    return "jlora deps: " + " ".join(found)
