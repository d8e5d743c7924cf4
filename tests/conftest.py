import os

# f32 matmuls at full precision so lifted-vs-merged comparisons are meaningful on every backend.
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
