"""The corpus shipped in data/: what the recipe and the benchmarks read, inside the repository."""

import hashlib
import importlib.util
import os

from jaxgpt import default_vocab
from jaxgpt.data import encode_text, read_text

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = os.path.join(ROOT, "data", "shakespeare.txt")
SHA256 = "a16ef539daeca9c7332f03a88c55f3b4283a7add3eb921e34317db9acca96e37"  # data/README.md


def test_corpus_is_the_documented_file_in_the_vocabulary():
    with open(CORPUS, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == SHA256
    text = read_text(CORPUS)
    assert text.count("\nby William Shakespeare\n") == 40  # the 40 works of data/README.md
    assert len(encode_text(text, default_vocab())) == len(text)  # raises on a character outside the map


def test_recipe_reads_the_corpus_in_the_repository():
    spec = importlib.util.spec_from_file_location("recipe", os.path.join(ROOT, "recipes", "default_checkpoint.py"))
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    assert os.path.samefile(recipe.TEXT, CORPUS)
