"""Method and optimizer state without pickle: a JSON skeleton plus one safetensors file.

Reading a pickle runs whatever code it holds, and run folders travel between people.
:func:`save_state` writes any nesting of dicts, lists, tuples, numbers, strings and
tensors as ``NAME.json`` (the structure, tensors replaced by references) and
``NAME.safetensors`` (the tensors); :func:`load_state` reads them back and executes
nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

FORMAT = "zotune-state/1"


def save_state(folder: Path, name: str, state) -> None:
    tensors: dict[str, torch.Tensor] = {}

    def encode(value):
        if isinstance(value, torch.Tensor):
            key = f"t{len(tensors)}"
            tensors[key] = value.detach().to("cpu", copy=True).contiguous()  # safetensors refuses shared storage
            return {"__tensor__": key}
        if isinstance(value, dict):
            if all(isinstance(k, str) and not k.startswith("__") for k in value):
                return {k: encode(v) for k, v in value.items()}
            return {"__items__": [[encode(k), encode(v)] for k, v in value.items()]}  # int keys (optimizer state)
        if isinstance(value, tuple):
            return {"__tuple__": [encode(v) for v in value]}
        if isinstance(value, list):
            return [encode(v) for v in value]
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        raise TypeError(f"cannot store a {type(value).__name__} in a checkpoint")

    skeleton = encode(state)
    save_file(tensors, folder / f"{name}.safetensors")
    (folder / f"{name}.json").write_text(json.dumps({"format": FORMAT, "state": skeleton}))


def load_state(folder: Path, name: str):
    document = json.loads((folder / f"{name}.json").read_text())
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise ValueError(f"{folder / name}.json is not a zotune state file ({FORMAT})")
    tensors = load_file(folder / f"{name}.safetensors")

    def decode(value):
        if isinstance(value, list):
            return [decode(v) for v in value]
        if not isinstance(value, dict):
            return value
        if "__tensor__" in value:
            return tensors[value["__tensor__"]]
        if "__items__" in value:
            return {decode(k): decode(v) for k, v in value["__items__"]}
        if "__tuple__" in value:
            return tuple(decode(v) for v in value["__tuple__"])
        return {k: decode(v) for k, v in value.items()}

    return decode(document["state"])
