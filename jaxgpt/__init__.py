"""jaxgpt: the notebook's character-level GPT in JAX/Flax NNX."""

from importlib import resources as _resources

from jaxgpt.config import PUBLISHED, GPTConfig
from jaxgpt.model import GPT, init_cache
from jaxgpt.vocab import DEFAULT_VOCAB_PATH, Vocab, VocabError, default_vocab
from jaxgpt.batching import Batcher, Event, Sampler
from jaxgpt.generate import generate, generate_tokens, stream_text, stream_tokens
from jaxgpt.options import Options
from jaxgpt.requests import Completion, complete, stream_completions
from jaxgpt.sampling import sampling_uniforms
from jaxgpt.host_memory import reuse_host_memory
from jaxgpt.score import score
from jaxgpt.beam import BeamResult, beam_search, beam_search_text

DEFAULT_WEIGHTS = str(_resources.files("jaxgpt") / "assets" / "default_weights.pt")
"""The bundled default checkpoint: a torch state dict of the published configuration trained on
public-domain Shakespeare (see the README for the recipe). Read it with `porting.load_weights`."""

__all__ = ["GPT", "DEFAULT_WEIGHTS", "GPTConfig", "PUBLISHED", "init_cache", "Vocab", "VocabError", "default_vocab", "DEFAULT_VOCAB_PATH",
           "Sampler", "generate", "generate_tokens", "stream_text", "stream_tokens",
           "Batcher", "Event", "Options", "Completion", "complete", "stream_completions", "sampling_uniforms",
           "reuse_host_memory", "score", "BeamResult", "beam_search", "beam_search_text"]
