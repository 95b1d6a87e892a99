"""Which model family a checkpoint belongs to, from its files alone (no weights loaded, no torch).

A worker serves one family; ``lisa-ls worker --model PATH`` looks here to pick the handler. A folder's
``config.json`` names its architecture in ``model_type``:

- ``llava`` (``LISAForCausalLM``): a LISA release, or this project's demo / tiny LISA checkpoints -> ``"lisa"``;
- ``sam3_video`` (the released ``facebook/sam3`` layout: detector + tracker in one file) or ``sam3`` (the detector
  alone) -> ``"sam3"``.

Anything else is refused with what was found, so that a wrong folder fails at start, not at the first query.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from model.errors import CheckpointError

LISA = "lisa"
SAM3 = "sam3"
#: Every family a worker can serve.
FAMILIES = (LISA, SAM3)

#: ``config.json`` ``model_type`` -> family.
MODEL_TYPES = {"llava": LISA, "sam3_video": SAM3, "sam3": SAM3}


def family_of_config(config: dict, where: str = "config.json") -> str:
    """The family of a parsed ``config.json``; raises :class:`CheckpointError` naming what it found."""
    model_type = config.get("model_type")
    family = MODEL_TYPES.get(str(model_type))
    if family is None:
        arch = ", ".join(config.get("architectures") or []) or "no architectures"
        raise CheckpointError(
            f"{where}: model_type {model_type!r} ({arch}) is neither a LISA checkpoint (model_type 'llava') nor a "
            "SAM 3 checkpoint (model_type 'sam3_video' as in facebook/sam3, or 'sam3'); pass a LISA or a SAM 3 "
            "release folder or Hub id"
        )
    return family


def read_config(model: str | os.PathLike) -> tuple[dict, str]:
    """``(config.json as a dict, where it was read)`` for a folder, or for a Hub id (``config.json`` alone is
    fetched, or found in the Hugging Face cache)."""
    path = Path(model).expanduser()
    if path.is_dir():
        file = path / "config.json"
        if not file.is_file():
            raise CheckpointError(f"{path}: no config.json; a checkpoint folder holds config.json and its weights")
    elif path.exists() or str(model).startswith((".", "/")) or str(model).count("/") != 1:
        raise CheckpointError(f"{model}: no such checkpoint folder (and not a Hub id like 'facebook/sam3').")
    else:
        try:
            from huggingface_hub import hf_hub_download

            file = Path(hf_hub_download(str(model), "config.json"))
        except Exception as e:  # network, auth, missing repo: all end the same way for the user
            raise CheckpointError(
                f"cannot read {model}'s config.json from the Hugging Face Hub ({type(e).__name__}: {e}). Check the "
                "id and the network, or download the folder elsewhere and pass its path."
            ) from e
    try:
        return json.loads(file.read_text()), str(file)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{file}: not a readable JSON config ({e})") from e


def family_of(model: str | os.PathLike) -> str:
    """``"lisa"`` or ``"sam3"`` for a checkpoint folder or Hub id; :class:`CheckpointError` otherwise."""
    config, where = read_config(model)
    return family_of_config(config, where)


def is_sam3(model: str | os.PathLike) -> bool:
    """Whether ``model`` is a SAM 3 checkpoint. Anything unreadable counts as not (the LISA loader then says what
    is wrong with it in its own words, as it always has)."""
    try:
        return family_of(model) == SAM3
    except CheckpointError:
        return False
