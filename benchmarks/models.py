"""The models every benchmark compares, built from one torch state dict.

The notebook's reference model (`porting.torch_reference`), the tuned torch baseline
(`benchmarks.torch_tuned`), jaxgpt's GPT (ported with `porting.load_weights` from the very
`weights.pt` file the torch models are loaded from) and, with the `[onnx]` extra, the reference
exported to ONNX and run on ONNX Runtime (`benchmarks.onnx_runtime`) share the same weights: the project's
default checkpoint when it exists, otherwise a seeded random initialisation of the reference
(speed does not depend on the values; parity figures are more telling with trained weights,
so the JSON says which was used).
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from jaxgpt.config import GPTConfig

# Max |logit difference| the tuned baseline may show against the reference, per unit of the
# largest |logit| (at least 1): float32 rounding grows with the logits' scale, and trained
# weights give logits up to ~12 where random ones stay near 1.
TUNED_TOLERANCE = 1e-5


@dataclasses.dataclass
class Models:
    """Same weights, three implementations.

    Attributes:
      config: the model configuration.
      weights_path: the torch `weights.pt` all three were loaded from.
      weights_source: human-readable origin of the weights.
      reference: the notebook's torch model (eval mode).
      tuned: `TunedGPT` (eval mode).
      jax: `jaxgpt.GPT` (eval mode).
      tuned_max_diff: max |tuned - reference| logits over the check inputs.
      torch_device: torch device string.
      ort: `benchmarks.onnx_runtime.OrtModel`, or None (not asked for, or the extra is missing).
      ort_max_diff: max |ORT - reference| logits over the check inputs (None without ORT).
    """

    config: GPTConfig
    weights_path: str
    weights_source: str
    reference: object
    tuned: object
    jax: object
    tuned_max_diff: float
    torch_device: str = "cpu"
    ort: object | None = None
    ort_max_diff: float | None = None


def default_weights() -> str | None:
    """Path of the project's default checkpoint if it is installed, else None."""
    import jaxgpt

    path = getattr(jaxgpt, "DEFAULT_WEIGHTS", None)
    return str(path) if path is not None and os.path.exists(path) else None


def build_models(config: GPTConfig, workdir: str, weights: str | None = None, torch_device: str = "cpu",
                 seed: int = 0, onnx: bool = False) -> Models:
    """Loads (or creates) a `weights.pt` and builds the models from it.

    Args:
      config: configuration to create random weights with; ignored when `weights` is given
        (the checkpoint's own configuration is used).
      workdir: where a random `weights.pt` is written.
      weights: an existing torch checkpoint, or None (use `config` with seeded random weights).
      torch_device: device of the torch models.
      seed: torch seed of the random initialisation.
      onnx: also export the reference to `workdir`/model.onnx and open it on ONNX Runtime (if
        the `[onnx]` extra is installed).

    Raises:
      AssertionError: the tuned baseline's (or ONNX Runtime's) logits differ from the
        reference by more than 1e-5 per unit of the largest |logit|.
    """
    import torch

    import porting
    from benchmarks.torch_tuned import TunedGPT
    from porting.torch_reference import reference_from_config

    if weights is None:
        torch.manual_seed(seed)
        reference = reference_from_config(config)
        weights = os.path.join(workdir, "weights.pt")
        torch.save(reference.state_dict(), weights)
        source = f"random initialisation (torch seed {seed})"
    else:
        source = os.path.basename(weights)
    jax_model = porting.load_weights(weights)
    config = jax_model.config
    state_dict = torch.load(weights, map_location="cpu", weights_only=True)
    reference = reference_from_config(config)
    reference.load_state_dict(state_dict, strict=True)
    reference = reference.to(torch_device).eval()
    tuned = TunedGPT.from_state_dict(state_dict, config).to(torch_device).eval()

    rng = np.random.default_rng(seed)
    tokens = torch.from_numpy(rng.integers(0, config.vocab_size, (4, config.context_length))).to(torch_device)
    with torch.inference_mode():
        expected = reference(tokens)
        diff = float((tuned(tokens) - expected).abs().max())
    tolerance = TUNED_TOLERANCE * max(1.0, float(expected.abs().max()))
    if not diff <= tolerance:
        raise AssertionError(f"tuned torch baseline differs from the reference by {diff:.3g} > {tolerance:.3g}")
    models = Models(config, weights, source, reference, tuned, jax_model, diff, torch_device)
    if onnx:
        from benchmarks import onnx_runtime

        if onnx_runtime.available():
            cpu_reference = reference_from_config(config)
            cpu_reference.load_state_dict(state_dict, strict=True)
            path = onnx_runtime.export(cpu_reference, os.path.join(workdir, "model.onnx"), config)
            models.ort = onnx_runtime.OrtModel(path)
            models.ort_max_diff = float(np.abs(models.ort.logits(tokens.cpu().numpy()) - expected.cpu().numpy()).max())
            if not models.ort_max_diff <= tolerance:
                raise AssertionError(f"ONNX Runtime differs from the reference by {models.ort_max_diff:.3g} > "
                                     f"{tolerance:.3g}")
    return models
