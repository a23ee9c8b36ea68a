"""`Options`: how one request samples and when it stops; the one way to say "sample like this"."""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping

import numpy as np

from jaxgpt import engine
from jaxgpt.sampling import SamplingParams
from jaxgpt.validation import integer, number
from jaxgpt.vocab import Vocab

MODES = ("exact", "strided")


def default_stride(context_length: int) -> int:
    return max(context_length // 2, 1)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Options:
    """One request's sampling and stopping options (see `jaxgpt.sampling` for the rule's order).

    Attributes:
      temperature: >= 0; 0 is greedy.
      top_k: keep the logits >= the k-th largest (ties kept); 1 is greedy; None keeps all.
      top_p: nucleus mass in (0, 1]; None keeps all.
      min_p: in [0, 1]: keep the characters with probability >= min_p x the top one; None keeps all.
      repetition_penalty: > 0; characters in the current window get positive logits divided by
        it and negative ones multiplied (CTRL); None (or 1) is none.
      logit_bias: character -> additive bias (-inf bans the character).
      stop: stop strings (at most `engine.MAX_STOPS`, each 1..`engine.MAX_STOP_LEN` characters);
        generation ends when the generated text ends with one, which is then not returned.
      logprobs: None: no log-probabilities; 0: the chosen character's; n > 0: also the n most
        likely characters' (at most `engine.MAX_TOP_LOGPROBS`).
      mode: "exact" (the notebook's loop) or "strided" (see `jaxgpt.generate`).
      stride: characters dropped at once when the window is full (strided only; default C // 2).
    """

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    logit_bias: Mapping[str, float] | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None
    mode: str = "exact"
    stride: int | None = None

    def __post_init__(self):
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif self.stop is None:
            object.__setattr__(self, "stop", ())
        elif isinstance(self.stop, list):
            object.__setattr__(self, "stop", tuple(self.stop))
        elif not isinstance(self.stop, tuple):
            raise ValueError(f"stop must be a string or a list of strings, got {type(self.stop).__name__}")
        number(self.temperature, "temperature", 0)
        if self.top_k is not None:
            integer(self.top_k, "top_k", 1)
        if self.top_p is not None:
            number(self.top_p, "top_p", 0, 1, low_open=True)
        if self.min_p is not None:
            number(self.min_p, "min_p", 0, 1)
        if self.repetition_penalty is not None:
            number(self.repetition_penalty, "repetition_penalty", 0, low_open=True)
        if self.logprobs is not None:
            integer(self.logprobs, "logprobs", 0, engine.MAX_TOP_LOGPROBS)
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.mode == "exact" and self.stride is not None:
            raise ValueError("stride applies to mode='strided' only")
        if self.stride is not None:
            integer(self.stride, "stride", 1)
        if len(self.stop) > engine.MAX_STOPS:
            raise ValueError(f"at most {engine.MAX_STOPS} stop strings, got {len(self.stop)}")
        for s in self.stop:
            if not isinstance(s, str) or not 1 <= len(s) <= engine.MAX_STOP_LEN:
                raise ValueError(f"a stop string must be a string of 1..{engine.MAX_STOP_LEN} characters, got {s!r}")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, Mapping):
                raise ValueError(f"logit_bias must map characters to numbers, got {type(self.logit_bias).__name__}")
            for char, bias in self.logit_bias.items():
                if not isinstance(char, str) or len(char) != 1:
                    raise ValueError(f"logit_bias keys must be single characters, got {char!r}")
                if isinstance(bias, bool) or not isinstance(bias, (int, float, np.integer, np.floating)) \
                        or math.isnan(bias) or bias == math.inf:
                    raise ValueError(f"logit_bias[{char!r}] must be a finite number or -inf, got {bias!r}")

    def keep(self, context_length: int) -> int:
        """Tokens kept when the window overflows: C (exact) or C + 1 - stride (strided)."""
        if self.mode == "exact":
            return context_length
        stride = default_stride(context_length) if self.stride is None else self.stride
        if stride > context_length:
            raise ValueError(f"stride must be in 1..context_length={context_length}, got {stride}")
        return context_length + 1 - stride

    def engine_row(self, vocab: Vocab | None, vocab_size: int, context_length: int):
        """The engine's per-row arrays: (keep, SamplingParams of one row, stops, stop_lengths, top_n).

        Raises:
          ValueError: a stop string or bias character outside the vocabulary (or text options
            without a vocabulary), every character banned, or a stride longer than the context.
        """
        bias = np.zeros(vocab_size, np.float32)
        if self.logit_bias:
            for char, value in self.logit_bias.items():
                bias[self._ids(vocab, char, "logit_bias character")[0]] += value
            if np.all(bias == -np.inf):
                raise ValueError("logit_bias bans every character of the vocabulary")
        stops = np.full((engine.MAX_STOPS, engine.MAX_STOP_LEN), -1, np.int32)
        lengths = np.zeros(engine.MAX_STOPS, np.int32)
        for m, s in enumerate(self.stop):
            stops[m, engine.MAX_STOP_LEN - len(s):] = self._ids(vocab, s, "stop string")
            lengths[m] = len(s)
        if self.logprobs is not None and self.logprobs > vocab_size:
            raise ValueError(f"logprobs must be at most the vocabulary size {vocab_size}, got {self.logprobs}")
        k = vocab_size if self.top_k is None else min(int(self.top_k), vocab_size)
        params = SamplingParams(
            np.float32(self.temperature), np.int32(k), np.float32(1.0 if self.top_p is None else self.top_p),
            np.float32(self.min_p or 0.0), np.float32(1.0 if self.repetition_penalty is None else self.repetition_penalty),
            bias)
        top_n = -1 if self.logprobs is None else int(self.logprobs)
        return np.int32(self.keep(context_length)), params, stops, lengths, np.int32(top_n)

    @staticmethod
    def _ids(vocab: Vocab | None, text: str, what: str) -> np.ndarray:
        if vocab is None:
            raise ValueError(f"a {what} needs a vocabulary matching the model's")
        unknown = vocab.unknown_chars(text)
        if unknown:
            raise ValueError(f"{what} {text!r} has characters outside the vocabulary: "
                             + ", ".join(repr(c) for c in unknown[:10]))
        return vocab.encode(text)
