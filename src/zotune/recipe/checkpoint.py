"""Checkpoint folders: durable, verified, and read without pickle.

* :func:`save_state` / :func:`load_state`: any nesting of dicts, lists, tuples, numbers,
  strings and tensors as ``NAME.json`` (the structure, tensors replaced by references)
  and ``NAME.safetensors``. Reading a pickle runs whatever code it holds, and run
  folders travel between people: nothing here unpickles.
* :func:`write_checkpoint`: fills a new folder, records the sha256 of every file in
  ``manifest.json``, fsyncs the files and the folder, and only then swaps it in; the
  previous checkpoint stays until the new one is complete, so at every instant one
  complete checkpoint exists (``checkpoint/``, or ``checkpoint.old/`` mid-swap).
* :func:`find_checkpoint` picks it and checks every file against the manifest.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from zotune.assets.cache import file_sha256
from zotune.errors import UserError

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


CHECKPOINT_FORMAT = "zotune-checkpoint/1"
MANIFEST = "manifest.json"


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_checkpoint(out: Path, fill) -> None:
    """``fill(folder)`` writes the checkpoint's files into a new folder, which then replaces
    ``out/checkpoint`` atomically, and may return the sha256 of files it linked from the
    previous checkpoint (``{name: digest}``, not hashed again). A failure while writing (a
    full disk) leaves the previous checkpoint as it was and is one line for the user."""
    final, partial, old = out / "checkpoint", out / "checkpoint.partial", out / "checkpoint.old"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        partial.mkdir()
        known = fill(partial) or {}
        files = {p.name: known.get(p.name) or file_sha256(p) for p in sorted(partial.iterdir())}
        (partial / MANIFEST).write_text(json.dumps({"format": CHECKPOINT_FORMAT, "sha256": files}))
        for path in partial.iterdir():
            _fsync(path)
        _fsync(partial)
    except OSError as error:
        shutil.rmtree(partial, ignore_errors=True)
        kept = "the previous checkpoint is intact" if final.is_dir() else "no checkpoint was kept"
        raise UserError(f"could not write a checkpoint in {out} ({error.strerror or error}); {kept}") from None
    if final.is_dir():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    partial.rename(final)
    _fsync(out)
    shutil.rmtree(old, ignore_errors=True)


def link_or_copy(source: Path, target: Path) -> None:
    """A file the new checkpoint shares unchanged with the previous one: a hard link writes no
    bytes, and the previous checkpoint's deletion leaves the data to the new one."""
    try:
        os.link(source, target)
    except OSError:  # a file system without hard links
        shutil.copyfile(source, target)


def current_checkpoint(out: Path) -> Path | None:
    """The complete checkpoint folder of a run (without verifying it), or None."""
    return next((out / name for name in ("checkpoint", "checkpoint.old") if (out / name).is_dir()), None)


def manifest_digests(folder: Path) -> dict:
    return json.loads((folder / MANIFEST).read_text())["sha256"]


def find_checkpoint(out: Path) -> Path | None:
    """The complete checkpoint of a run folder, verified against its manifest; None if there is none."""
    folder = current_checkpoint(out)
    if folder is not None:
        verify_checkpoint(folder)
    return folder


def verify_checkpoint(folder: Path) -> None:
    manifest = folder / MANIFEST
    if not manifest.is_file():
        if (folder / "state.pt").is_file():  # written by zotune before 0.2, which kept no manifest
            return
        raise UserError(f"{manifest} is missing, so the checkpoint cannot be verified; restore it from a copy of "
                        "the run folder, or restart the run with --overwrite")
    try:
        document = json.loads(manifest.read_text())
        files = document["sha256"]
        assert document["format"] == CHECKPOINT_FORMAT
    except Exception:  # noqa: BLE001 - whatever is wrong with it, the answer is the same
        raise UserError(f"{manifest} is damaged or from another zotune version; restart the run with "
                        "--overwrite") from None
    for name, expected in files.items():
        path = folder / name
        if not path.is_file() or file_sha256(path) != expected:
            raise UserError(f"{path} is missing or damaged (its checksum does not match the manifest); restart "
                            "the run with --overwrite, or resume from a copy of the run folder")
