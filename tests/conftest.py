"""Session-wide test settings.

On a GPU or TPU, JAX multiplies float32 matrices with reduced-precision passes by default
(TF32 on recent NVIDIA GPUs, bfloat16 passes on TPUs), which alone exceeds the 1e-5 logit
tolerance of the parity tests against torch's float32 CPU reference. There the whole suite
runs with full float32 matmuls. On CPU nothing changes: XLA:CPU multiplies float32 in float32.
"""

import jax


def pytest_configure(config):
    if jax.default_backend() != "cpu":
        jax.config.update("jax_default_matmul_precision", "highest")
