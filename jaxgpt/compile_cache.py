"""JAX's persistent compilation cache for the command line, in the user's cache directory.

A cold `jaxgpt generate` spends most of its start-up compiling the prefill and the generation
loop; with the cache a second run loads the compiled programs from disk instead (timings:
README, "Command line"). The library never turns the cache on by itself (that is the
application's choice); the CLI calls `enable()` before anything compiles.

Location: $JAXGPT_CACHE_DIR if set, else $XDG_CACHE_HOME/jaxgpt/jax, else ~/.cache/jaxgpt/jax.
Set JAXGPT_NO_COMPILE_CACHE=1 to leave it off. The cache is trusted code: it is created
readable and writable by the user only.
"""

from __future__ import annotations

import os
import sys

_enabled_dir: str | None = None


def cache_dir() -> str:
    """The directory the CLI uses for compiled programs (not created)."""
    explicit = os.environ.get("JAXGPT_CACHE_DIR")
    if explicit:
        return os.path.abspath(os.path.expanduser(explicit))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(os.path.abspath(base), "jaxgpt", "jax")


def enable(path: str | None = None) -> str | None:
    """Turns on JAX's persistent compilation cache; call before the first compilation.

    Every compiled program is stored, however quick to compile (the small ones still cost
    start-up time). Failing to create the directory only disables the cache, with a note on
    stderr: a read-only home must not stop generation.

    Args:
      path: cache directory; default `cache_dir()`.

    Returns:
      The directory in use, or None when disabled (JAXGPT_NO_COMPILE_CACHE or an unusable path).
    """
    global _enabled_dir
    if os.environ.get("JAXGPT_NO_COMPILE_CACHE"):
        return None
    path = path or cache_dir()
    if _enabled_dir == path:
        return path
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
    except OSError as e:
        print(f"jaxgpt: note: compilation cache disabled ({path}: {e.strerror or e})", file=sys.stderr)
        return None
    import jax

    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    _enabled_dir = path
    return path
