"""What a diffusers pipeline folder must contain before ``from_pretrained`` is tried.

Checking first turns diffusers' scattered errors (or a silent download attempt) into one
message that lists everything missing.
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["missing_parts"]

_WEIGHT_SUFFIXES = (".safetensors", ".bin")
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "spiece.model", "tokenizer_config.json")


def missing_parts(directory: Path) -> list[str]:
    """What ``directory`` lacks to be a loadable pipeline folder, as short phrases
    (empty when complete). Reads only ``model_index.json`` and folder listings."""
    if not directory.is_dir():
        return [f"the folder itself ({directory} does not exist)"]
    index_file = directory / "model_index.json"
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return ["model_index.json"]
    except (OSError, ValueError) as exc:
        return [f"a readable model_index.json ({exc})"]
    missing: list[str] = []
    for name, spec in sorted(index.items()):
        if name.startswith("_") or not isinstance(spec, list) or spec[0] is None:
            continue  # metadata, or an optional component saved as null
        folder = directory / name
        if not folder.is_dir():
            missing.append(f"{name}/")
            continue
        files = {path.name for path in folder.iterdir() if path.is_file()}
        if "tokenizer" in name:
            if not files.intersection(_TOKENIZER_FILES):
                missing.append(f"{name}/ tokenizer files")
        elif "scheduler" in name:
            if "scheduler_config.json" not in files:
                missing.append(f"{name}/scheduler_config.json")
        else:
            if "config.json" not in files:
                missing.append(f"{name}/config.json")
            if not any(file.endswith(_WEIGHT_SUFFIXES) for file in files):
                missing.append(f"{name}/ weights (*.safetensors)")
    return missing
