"""Issue 12's fault matrix: each file of a finished run folder, damaged in turn, under the
commands that read the folder (``eval``; ``replay`` for the runs that record a trajectory),
and each file of an interrupted run under ``train --resume``.

A command that reads the damaged file exits 2 with one line that names it; one that does not
read it exits 0 (two damages show that: replaced, deleted); none ends in a traceback. What
is detected, and where:

- ``config.yaml`` (``config.load_run``): YAML that does not parse or is not a mapping, a
  value of the wrong type, an empty file, keys lost to a cut (a file of the current format
  holds every setting, after ``zotune_format``), a ``zotune_format`` newer than this zotune.
- the JSON files of ``model/`` and ``adapter/`` (``models.check_files``): each must parse as
  an object.
- ``*.safetensors`` (``models.check_files``): the header and the length it promises. Bytes
  garbled in the tensor data are *not* detected: safetensors keeps no checksum, so those
  weights load changed and the command exits 0 (a user may edit weights on purpose).
- ``trajectory.json`` (``evaluation.replay_run``): it must load as a trajectory of a known
  format.
- a deleted file: the loader's own check names it (``no config.json``, ``no trajectory.json``,
  the adapter weights, the tokenizer files). A deleted ``model/generation_config.json`` is
  no damage: transformers falls back to its defaults, and zotune never generates.

``result.json``, ``samples.json``, ``metrics.jsonl`` and ``adapter/README.md`` are read by
neither command. ``train --resume`` of an interrupted run reads config.yaml, samples.json,
metrics.jsonl and checkpoint/, whose manifest holds a checksum of each of its files.
"""

import re
import shutil
from pathlib import Path

import pytest

from zotune import cli
from .test_checkpoint import _interrupted_run
from ..test_cli import CSV_TASK


def truncate(path: Path):  # a full disk, an interrupted copy
    content = path.read_bytes()
    path.write_bytes(content[: len(content) // 2])


GARBAGE = b"\xff\x00garbled!\x00\xff\xfe###"  # 16 bytes, not UTF-8


def garble_middle(path: Path):  # bad sectors, a bad transfer; safetensors: in the middle of the tensor data
    content = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(content[:8], "little") if path.suffix == ".safetensors" else 0
    middle = (start + len(content)) // 2
    content[middle:middle + len(GARBAGE)] = GARBAGE
    path.write_bytes(bytes(content))


def garble_head(path: Path):  # safetensors: inside the JSON header, after its 8-byte length
    content = bytearray(path.read_bytes())
    content[8:8 + len(GARBAGE)] = GARBAGE
    path.write_bytes(bytes(content))


def replace_with_text(path: Path):  # another file saved over it
    path.write_text("this is not what zotune wrote\n")


def empty(path: Path):
    path.write_bytes(b"")


def delete(path: Path):
    path.unlink()


def newer(path: Path):  # written by a later zotune
    text = path.read_text()
    changed = re.sub(r"^zotune_format: \d+$", "zotune_format: 99", text, flags=re.M)
    changed = changed.replace("zotune-trajectory/2", "zotune-trajectory/99")
    assert changed != text, path
    path.write_text(changed)


DAMAGES = {f.__name__: f for f in (truncate, garble_middle, garble_head, replace_with_text, empty, delete, newer)}
VERSIONED = ("config.yaml", "trajectory.json")  # the files that say which format they are in
METHODS = ("mezo", "lora-ft", "lmao")
# LMAO's model/, config.yaml and the rest are written and read as MeZO's are: its own part is the adapter
# (which replay merges to compare) and its trajectory.
ONLY = {"lmao": ("adapter", "trajectory.json")}


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    """One finished run folder per method, built once for the module."""
    root = tmp_path_factory.mktemp("finished")
    for method in METHODS:
        args = ["train", "--model", str(tiny_model_dir), *CSV_TASK, "--steps", "2", "--batch-size", "2",
                "--method", method, "--lr", "1e-2", "--no-zero-shot", "--no-progress", "--output", str(root / method)]
        assert cli.main(args) == 0
    return root


def reads(command: str, rel: Path, has_model: bool) -> bool:
    """Whether ``command`` needs the run file ``rel``."""
    top = rel.parts[0]
    if rel.name == "README.md":  # peft's model card
        return False
    if top == "adapter":  # a run with a model/ evaluates that (its adapter is merged into it); replay compares both
        return command == "replay" or not has_model
    return top in ("config.yaml", "model") or (top == "trajectory.json" and command == "replay")


def run_files(folder: Path, method: str | None = None) -> list[Path]:
    files = sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file())
    only = ONLY.get(method)
    return [rel for rel in files if only is None or rel.parts[0] in only]


def outcome(capsys, args) -> tuple:
    """(exit code, stderr lines), or the exception that escaped main."""
    capsys.readouterr()
    try:
        code = cli.main(args)
    except Exception as error:  # noqa: BLE001 - what the test is for
        return "traceback", f"{type(error).__name__}: {error}"
    return code, capsys.readouterr().err.splitlines()


def misjudged(rel: Path, path: Path, damage: str, detected: bool, code, err: list[str]) -> str | None:
    """What is wrong with the outcome (None: nothing): a detected damage is exit 2 and one line that
    names the file (by its path; a deleted one by its name); an undetected one is exit 0."""
    named = rel.name if damage == "delete" else str(path)
    if detected:
        ok = code == 2 and len(err) == 1 and err[0].startswith("zotune: error: ") and named in err[0]
    else:
        ok = code == 0 and not any("error" in line or "Traceback" in line for line in err)
    expected = "exit 2 naming it" if detected else "exit 0"
    return None if ok else f"{rel} ({damage}): expected {expected}, got {code}: {err}"


def damages(rel: Path, read: bool = True) -> list[str]:
    """Every damage for a file the command reads; for one it does not read, two show that."""
    if not read:
        return ["replace_with_text", "delete"]
    return [name for name in DAMAGES if name != "newer" or rel.name in VERSIONED]


@pytest.mark.parametrize("method, command", [("mezo", "eval"), ("mezo", "replay"), ("lora-ft", "eval"),
                                             ("lmao", "eval"), ("lmao", "replay")])
def test_each_damaged_run_file_is_one_line_or_unread(runs, tmp_path, capsys, method, command):
    run = tmp_path / method
    shutil.copytree(runs / method, run)
    args = {"eval": ["eval", "--run", str(run), "--no-progress"], "replay": ["replay", "--run", str(run)]}[command]
    wrong = []
    for rel in run_files(run, method):
        read = reads(command, rel, (run / "model").is_dir())
        for damage in damages(rel, read):
            path = run / rel
            original = path.read_bytes()
            DAMAGES[damage](path)
            try:
                code, err = outcome(capsys, args)
            finally:
                path.write_bytes(original)
            # Undetectable by design, or no damage: see the module's docstring.
            detected = read and not ((damage == "garble_middle" and rel.suffix == ".safetensors")
                                     or (damage == "delete" and rel.name == "generation_config.json"))
            wrong.append(misjudged(rel, path, damage, detected, code, err))
    assert not any(wrong), "\n".join(filter(None, wrong))


@pytest.fixture(scope="module")
def interrupted(tiny_model_dir, tmp_path_factory):
    """A MeZO run stopped after step 2 of 4, with its checkpoint."""
    out = tmp_path_factory.mktemp("interrupted") / "run"
    with pytest.MonkeyPatch.context() as monkeypatch:
        _interrupted_run(tiny_model_dir, out, monkeypatch)
    return out


def test_each_damaged_file_of_an_interrupted_run_is_one_line_on_resume(interrupted, tmp_path, capsys):
    files = run_files(interrupted)
    assert "checkpoint" in {rel.parts[0] for rel in files}
    wrong = []
    for number, (rel, damage) in enumerate((rel, damage) for rel in files for damage in damages(rel)):
        run = tmp_path / str(number)  # resume finishes the run: a fresh copy each time
        shutil.copytree(interrupted, run)
        path = run / rel
        DAMAGES[damage](path)
        code, err = outcome(capsys, ["train", "--resume", str(run), "--no-progress"])
        # Not damage: metrics.jsonl absent, emptied or with a last row that is no JSON (of its two rows,
        # the middle is in the last) is a run killed while it wrote a row; resume warns, runs the step again.
        detected = rel.name != "metrics.jsonl" or damage == "garble_head"
        wrong.append(misjudged(rel, path, damage, detected, code, err))
    assert not any(wrong), "\n".join(filter(None, wrong))


def edit_setting(run: Path, key: str, value: str | None):
    """Sets (appends, or with None deletes) the line ``key: value`` of the run's config.yaml."""
    path = run / "config.yaml"
    line = f"{key}: {value}\n" if value is not None else ""
    text, count = re.subn(rf"^{key}:.*\n", line, path.read_text(), flags=re.M)
    path.write_text(text if count else text + line)


@pytest.mark.parametrize("key, value, expected", [
    ("steps", "abc", "config key steps: expected a number, got 'abc'"),
    ("steps", "null", "config key steps: expected a number, got None"),
    ("zero_shot", "maybe", "config key zero_shot: expected true or false, got 'maybe'"),
    ("model", "[a, b]", "config key model: expected text, got ['a', 'b']"),
    ("method", "{a: 1}", "config key method: expected text"),
    ("task", "mnli", "unknown task 'mnli'"),
    ("lr_zo", "-1", "--lr-zo must be 0 or more"),
    ("bogus", "1", "unknown config keys ['bogus']"),
    ("seed", None, "lacks seed: it was cut short or edited"),
    ("zotune_format", "99", "written by a newer zotune"),
    ("zotune_format", "abc", "written by a newer zotune"),
])
def test_a_bad_setting_in_config_yaml_names_the_file(runs, tmp_path, capsys, key, value, expected):
    run = tmp_path / "run"
    shutil.copytree(runs / "mezo", run)
    edit_setting(run, key, value)
    for args in (["eval", "--run", str(run), "--no-progress"], ["replay", "--run", str(run)],
                 ["train", "--resume", str(run), "--no-progress"]):
        code, err = outcome(capsys, args)
        assert code == 2 and len(err) == 1 and str(run / "config.yaml") in err[0] and expected in err[0], (args, err)


def test_config_yaml_carries_its_format_and_older_files_still_load(runs, tmp_path, capsys):
    from zotune.recipe import config as cfg
    run = tmp_path / "run"
    shutil.copytree(runs / "mezo", run)
    assert (run / "config.yaml").read_text().startswith(f"zotune_format: {cfg.FORMAT}\n")
    # A run's config.yaml as --config: the version is no option.
    assert cfg.from_mapping(cfg.load_yaml(str(run / "config.yaml"))).steps == 2
    # Written before the version existed: accepted, and a later setting may be absent (its default stands in).
    edit_setting(run, "zotune_format", None)
    edit_setting(run, "seed", None)
    assert outcome(capsys, ["eval", "--run", str(run), "--no-progress"])[0] == 0
    assert outcome(capsys, ["replay", "--run", str(run)])[0] == 0
