import json
import subprocess
import sys

import pytest

from zotune import cli
from .conftest import DATA

CSV_TASK = ["--task", "csv", "--data", str(DATA / "reviews.csv"), "--template", "{text} It was",
            "--candidates", "neg=terrible,pos=great", "--n-train", "16", "--n-dev", "4", "--n-test", "8"]


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "zotune", *args], capture_output=True, text=True)


def test_version():
    result = run_cli("--version")
    assert result.returncode == 0 and result.stdout.startswith("zotune ")


def test_train_eval_replay(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--model", str(tiny_model_dir), *CSV_TASK, "--steps", "3", "--batch-size", "2",
            "--lr-zo", "1e-3", "--output", str(out), "--no-progress"]
    assert cli.main(args) == 0
    assert "test accuracy zero-shot" in capsys.readouterr().out
    assert cli.main(["eval", "--run", str(out), "--no-progress"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["test_accuracy"] == json.loads((out / "result.json").read_text())["test_accuracy"]
    assert cli.main(["replay", "--run", str(out), "--output", str(tmp_path / "replayed")]) == 0
    assert "bit-identical" in capsys.readouterr().out


def test_yaml_config_with_cli_override(tiny_model_dir, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {tiny_model_dir}\ntask: jsonl\ndata: {DATA / 'reviews.jsonl'}\n"
                      "template: '{text} It was'\ncandidates: {neg: terrible, pos: great}\n"
                      "n_train: 8\nn_dev: 0\nn_test: 4\nsteps: 50\nbatch_size: 2\nzero_shot: false\n")
    out = tmp_path / "run"
    assert cli.main(["train", "--config", str(config), "--steps", "2", "--output", str(out), "--no-progress"]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["steps"] == 2 and result["zero_shot_accuracy"] is None


@pytest.fixture
def bad_inputs(tiny_model_dir, tmp_path):
    malformed = tmp_path / "bad.jsonl"
    malformed.write_text('{"text": "good film", "label": "pos"}\n{"text": oops}\n')
    unknown_label = tmp_path / "label.csv"
    unknown_label.write_text("text,label\ngood film,pos\ndull film,meh\n")
    finished = tmp_path / "finished"
    finished.mkdir()
    (finished / "config.yaml").write_text("method: mezo\n")
    model = ["--model", str(tiny_model_dir)]
    return {
        "unknown task": ([*model, "--task", "mnli"], "unknown task 'mnli'"),
        "unknown method": ([*model, *CSV_TASK, "--method", "adam"], "unknown method 'adam': choose one of mezo"),
        "missing model": (["--model", str(tmp_path / "nowhere"), *CSV_TASK], "does not exist"),
        "not a model": (["--model", str(tmp_path), *CSV_TASK], "is not a model folder"),
        "malformed data": ([*model, *CSV_TASK[:2], "--task", "jsonl", "--data", str(malformed), *CSV_TASK[4:]],
                           "bad.jsonl:2: not valid JSON"),
        "unknown label": ([*model, *CSV_TASK[:2], "--data", str(unknown_label), *CSV_TASK[4:]],
                          "label.csv:3: label 'meh' is not among the candidates"),
        "eps": ([*model, *CSV_TASK, "--eps", "0"], "--eps must be positive"),
        "steps": ([*model, *CSV_TASK, "--steps", "0"], "--steps must be positive"),
        "occupied output": ([*model, *CSV_TASK, "--output", str(finished)], "holds another run"),
        "missing config": (["--config", str(tmp_path / "none.yaml")], "does not exist"),
    }


CASES = ["unknown task", "unknown method", "missing model", "not a model", "malformed data", "unknown label", "eps",
         "steps", "occupied output", "missing config"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_and_exit_2(bad_inputs, tmp_path, case, capsys):
    args, expected = bad_inputs[case]
    if "--output" not in args:
        args = [*args, "--output", str(tmp_path / "out")]
    try:
        code = cli.main(["train", *args, "--no-progress"])
    except SystemExit as exit:  # argparse's own errors
        code = exit.code
    assert code == 2
    stderr = capsys.readouterr().err.strip()
    assert expected in stderr.splitlines()[-1]


@pytest.mark.parametrize("args, expected", [
    (["trian"], "unknown command 'trian'; did you mean 'train'?"),
    (["train", "--method", "meza"], "unknown method 'meza'; did you mean 'mezo'?"),
    (["train", "--lr-z0", "1e-3"], "unknown option '--lr-z0'; did you mean '--lr-zo'?"),
    (["train", "--task", "rt-sbj"], "unknown task 'rt-sbj'; did you mean 'rt-subj'?"),
    (["bench", "--dtype", "fp61"], "unknown dtype 'fp61'; did you mean 'fp16'?"),
])
def test_a_mistyped_name_is_one_line_with_the_closest_match(args, expected, capsys):
    try:
        code = cli.main(args)
    except SystemExit as exit:
        code = exit.code
    assert code == 2
    assert capsys.readouterr().err == f"zotune: error: {expected}\n"


def test_user_error_in_a_subprocess_has_no_traceback(tiny_model_dir, tmp_path):
    result = run_cli("train", "--model", str(tiny_model_dir), "--task", "mnli", "--output", str(tmp_path / "o"))
    assert result.returncode == 2
    error = result.stderr.strip()
    assert error.startswith("zotune: error: unknown task 'mnli': choose one of rt-sst2, sst2, csv, jsonl") and "\n" not in error
