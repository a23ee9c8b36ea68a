"""jaxgpt: the notebook's character-level GPT in JAX/Flax NNX."""

from jaxgpt.config import PUBLISHED, GPTConfig
from jaxgpt.model import GPT, init_cache
from jaxgpt.vocab import DEFAULT_VOCAB_PATH, Vocab, VocabError, default_vocab

__all__ = ["GPT", "GPTConfig", "PUBLISHED", "init_cache", "Vocab", "VocabError", "default_vocab", "DEFAULT_VOCAB_PATH"]
