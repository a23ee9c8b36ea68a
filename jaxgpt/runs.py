"""A training run's directory: orbax checkpoints, `run.json` (what they were trained with), history.

Resuming is checked, not assumed: `run.json` records the model configuration, the TrainConfig
fields that decide the weights and the caller's `run_info` (e.g. a hash of the text), and a run
with other settings is refused with every difference named.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import TYPE_CHECKING

import jax

from jaxgpt.atomic import write_json
from jaxgpt.config import GPTConfig

if TYPE_CHECKING:
    from jaxgpt.train import TrainConfig

RUN_FILE = "run.json"  # beside the orbax step directories: what the checkpoints were trained with
HISTORY_FILE = "history.json"


class ResumeError(ValueError):
    """A checkpoint directory holds a run that the requested one cannot continue."""


def run_record(model_config: GPTConfig, config: TrainConfig, run_info: dict | None = None) -> dict:
    """What decides a run's numbers: the model config, the numeric TrainConfig fields, `run_info`."""
    return {
        "model": dataclasses.asdict(model_config),
        "train": config.numeric(),
        "run": dict(run_info or {}),
    }


def check_resumable(checkpoint_dir: str, model_config: GPTConfig, config: TrainConfig,
                    run_info: dict | None = None) -> int | None:
    """The step a run in `checkpoint_dir` would resume from, after checking it is the same run.

    Args:
      checkpoint_dir: a `fit` checkpoint directory (need not exist).
      model_config, config, run_info: the run about to start.

    Returns:
      The latest saved step, or None when there is no checkpoint to resume.

    Raises:
      ResumeError: the saved run differs (each differing setting is named), or its record is unreadable.
    """
    run_path = os.path.join(checkpoint_dir, RUN_FILE)
    latest = latest_step(checkpoint_dir)
    if latest is None:
        return None
    if not os.path.exists(run_path):  # written by an older fit: nothing to compare against
        return latest
    try:
        with open(run_path, encoding="utf-8") as f:
            saved = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ResumeError(f"{run_path}: unreadable run record ({e})") from None
    now = json.loads(json.dumps(run_record(model_config, config, run_info)))  # tuples -> lists, as saved
    diffs = []
    for section in ("model", "train", "run"):
        old, new = saved.get(section, {}), now[section]
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                diffs.append(f"{key} {_short(old.get(key))} (now {_short(new.get(key))})")
    if diffs:
        raise ResumeError(
            f"{checkpoint_dir} holds checkpoints (up to step {latest}) of a different run: {'; '.join(diffs)}; "
            "use the same settings to resume it, or another output directory"
        )
    return latest


def _short(value) -> str:
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, (int, float)) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def latest_step(checkpoint_dir: str) -> int | None:
    """The latest complete orbax checkpoint step in `checkpoint_dir`, without creating anything."""
    if not os.path.isdir(checkpoint_dir):
        return None
    steps = [int(name) for name in os.listdir(checkpoint_dir)
             if name.isdigit() and os.path.isdir(os.path.join(checkpoint_dir, name))]
    return max(steps) if steps else None


class RunDirectory:
    """A run directory: orbax checkpoints (params, optimizer state), `run.json`, the history file."""

    def __init__(self, directory: str, history_path: str | None, on_checkpoint, primary: bool):
        import orbax.checkpoint as ocp

        self.directory, self.history_path, self.on_checkpoint, self.primary = (
            directory, history_path, on_checkpoint, primary)
        # Saves happen exactly when fit decides (force=True), synchronously, so a checkpoint on
        # disk is complete when fit moves on. Orbax writes each step to a temporary directory and
        # renames it when complete; leftovers of an interrupted save are removed at the next start.
        options = ocp.CheckpointManagerOptions(max_to_keep=2, create=True, enable_async_checkpointing=False,
                                               cleanup_tmp_directories=True)
        self._manager = ocp.CheckpointManager(os.path.abspath(directory), options=options)

    def start(self, latest: int | None, record: dict, params, opt_state):
        """(params, opt_state, history) to continue from: step `latest`'s, or a new run's (records it)."""
        import orbax.checkpoint as ocp

        if latest is None:
            if self.primary:
                write_json(os.path.join(self.directory, RUN_FILE), record)
            return params, opt_state, []
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, {"params": params, "opt_state": opt_state})
        restored = self._manager.restore(latest, args=ocp.args.StandardRestore(abstract))
        history = []
        if self.history_path is not None and os.path.exists(self.history_path):
            with open(self.history_path, encoding="utf-8") as f:
                history = [h for h in json.load(f) if h["step"] <= latest]
        return restored["params"], restored["opt_state"], history

    def save(self, done: int, params, opt_state, history: list[dict]) -> None:
        import orbax.checkpoint as ocp

        # Every process must call save (a collective): orbax picks which process writes each
        # array's data (a replicated array once) and writes the step's metadata from process 0.
        self._manager.save(done, args=ocp.args.StandardSave({"params": params, "opt_state": opt_state}), force=True)
        self._manager.wait_until_finished()
        if self.history_path is not None and self.primary:
            write_json(self.history_path, history)
        if self.on_checkpoint is not None:
            self.on_checkpoint(done, history)

    def close(self) -> None:
        self._manager.close()


def open_run(checkpoint_dir: str, history_path: str | None, on_checkpoint, primary: bool, model_config: GPTConfig,
              config: TrainConfig, run_info: dict | None, params, opt_state):
    """(RunDirectory, first step, params, opt_state, history) of the run to continue in `checkpoint_dir`.

    A new run records itself in `run.json`; an existing one must be the same run (see
    `check_resumable`) and is restored from its latest checkpoint.
    """
    latest = check_resumable(checkpoint_dir, model_config, config, run_info)
    if latest is not None and latest > config.steps:
        raise ResumeError(f"{checkpoint_dir} holds a checkpoint at step {latest}, beyond steps={config.steps}")
    checkpoints = RunDirectory(checkpoint_dir, history_path, on_checkpoint, primary)
    try:
        params, opt_state, history = checkpoints.start(latest, run_record(model_config, config, run_info), params,
                                                       opt_state)
    except BaseException:
        checkpoints.close()
        raise
    return checkpoints, latest or 0, params, opt_state, history
