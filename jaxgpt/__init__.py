"""jaxgpt: the notebook's character-level GPT in JAX/Flax NNX."""

from jaxgpt.config import PUBLISHED, GPTConfig
from jaxgpt.model import GPT, init_cache
from jaxgpt.vocab import DEFAULT_VOCAB_PATH, Vocab, VocabError, default_vocab
from jaxgpt.generate import generate, generate_tokens, stream_text, stream_tokens
from jaxgpt.sampling import Greedy, Multinomial, Sampling, TopK, TopP, sampling_uniforms

__all__ = ["GPT", "GPTConfig", "PUBLISHED", "init_cache", "Vocab", "VocabError", "default_vocab", "DEFAULT_VOCAB_PATH",
           "generate", "generate_tokens", "stream_text", "stream_tokens",
           "Greedy", "Multinomial", "Sampling", "TopK", "TopP", "sampling_uniforms"]
