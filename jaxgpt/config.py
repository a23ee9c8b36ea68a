"""Model configuration: one frozen dataclass, hashable so it can be a static jit argument."""

from __future__ import annotations

import dataclasses
from typing import Literal

from jaxgpt.validation import number, positive_int

Variant = Literal["drake", "learning"]
VARIANTS: tuple[str, ...] = ("drake", "learning")


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """Hyper-parameters of the notebook's character-level GPT.

    Attributes:
      vocab_size: number of characters in the vocabulary.
      context_length: maximum sequence length (number of learned positions).
      model_dim: residual stream width d.
      num_blocks: number of transformer blocks.
      num_heads: attention heads per block; head_size = model_dim // num_heads.
      variant: "drake" (published checkpoint: attention output projection `compute`)
        or "learning" (step-by-step notebook: heads concatenated straight into the residual).
      dropout: dropout rate, used only in training mode.
    """

    vocab_size: int = 104
    context_length: int = 128
    model_dim: int = 252
    num_blocks: int = 6
    num_heads: int = 6
    variant: Variant = "drake"
    dropout: float = 0.2

    def __post_init__(self):
        for name in ("vocab_size", "context_length", "model_dim", "num_blocks", "num_heads"):
            positive_int(getattr(self, name), f"GPTConfig.{name}")
        if self.model_dim % self.num_heads:
            # The notebook concatenates num_heads heads of model_dim // num_heads features back
            # into the model_dim residual stream, so the division must be exact.
            raise ValueError(
                f"GPTConfig.model_dim ({self.model_dim}) must be divisible by num_heads ({self.num_heads})"
            )
        if self.variant not in VARIANTS:
            raise ValueError(f"GPTConfig.variant must be one of {VARIANTS}, got {self.variant!r}")
        number(self.dropout, "GPTConfig.dropout", 0.0, 1.0, high_open=True)

    @property
    def head_size(self) -> int:
        return self.model_dim // self.num_heads

    @property
    def hidden_dim(self) -> int:
        """Width of the feed-forward layer (4 * model_dim, as in the notebook)."""
        return 4 * self.model_dim

    def num_params(self) -> int:
        """Parameter count of the torch state dict with this configuration."""
        d, v, c, f = self.model_dim, self.vocab_size, self.context_length, self.hidden_dim
        attention = 3 * d * d + (d * d + d if self.variant == "drake" else 0)
        block = attention + (d * f + f) + (f * d + d) + 4 * d
        return v * d + c * d + self.num_blocks * block + 2 * d + (d * v + v)

    def replace(self, **changes) -> "GPTConfig":
        return dataclasses.replace(self, **changes)


PUBLISHED = GPTConfig()
"""The configuration of the published `weights.pt` (4,672,688 parameters)."""
