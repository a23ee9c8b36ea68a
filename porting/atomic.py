"""porting's atomic writers: `jaxgpt.atomic`'s, raising CheckpointError for a destination that
cannot be written (so every porting problem is one exception type)."""

from __future__ import annotations

import functools

from jaxgpt import atomic
from porting.errors import CheckpointError

atomic_file = functools.partial(atomic.atomic_file, error=CheckpointError)
atomic_directory = functools.partial(atomic.atomic_directory, error=CheckpointError)
