"""Porting between the notebook's torch checkpoints and jaxgpt's Flax parameters.

Reading never imports torch (a restricted zip+pickle reader); writing `.pt` files does.

    model = porting.load_weights("weights.pt")      # variant and config inferred
    porting.save_weights(model, "out.pt")           # loads strictly into the notebook's class
    porting.convert("weights.pt", "weights.safetensors")

Every problem with a file is a `CheckpointError` (a ValueError) naming the file.
"""

from porting.errors import CheckpointError, TorchUnavailableError
from porting.export import (
    FORMATS,
    convert,
    flax_metadata,
    output_format,
    save_flax,
    save_weights,
    state_dict_from_model,
    verify,
    write_params,
)
from porting.keymap import (
    TABLE,
    check_layout,
    detect_naming,
    infer_config,
    layout,
    params_from_state_dict,
    state_dict_from_params,
)
from porting.load import (
    Checkpoint,
    load_weights,
    model_from_params,
    params_from_model,
    read_checkpoint,
    read_state_dict,
)

__all__ = [
    "CheckpointError",
    "TorchUnavailableError",
    "load_weights",
    "save_weights",
    "save_flax",
    "convert",
    "verify",
    "read_state_dict",
    "read_checkpoint",
    "Checkpoint",
    "FORMATS",
    "output_format",
    "write_params",
    "flax_metadata",
    "state_dict_from_model",
    "params_from_model",
    "model_from_params",
    "TABLE",
    "layout",
    "detect_naming",
    "infer_config",
    "check_layout",
    "params_from_state_dict",
    "state_dict_from_params",
]
