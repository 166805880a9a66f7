"""Inputs that would give wrong numbers without an error are refused, in one line."""

import pytest
from transformers import AutoTokenizer

from zotune.assets import models
from zotune.errors import UserError
from zotune.tasks.scoring import Scorer

from ..conftest import save_tiny_model, tiny_model


def test_a_folder_without_a_usable_tokenizer_is_refused(tmp_path):
    folder = save_tiny_model(tmp_path / "model")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    small = tiny_model("llama")
    with pytest.raises(UserError, match="no usable tokenizer"):
        models.check_tokenizer("x", small, type("Tiny", (), {"__len__": lambda self: 5})())
    small.resize_token_embeddings(8)
    with pytest.raises(UserError, match="do not belong together"):
        models.check_tokenizer("x", small, tokenizer)
    models.check_tokenizer("x", tiny_model("llama"), tokenizer)  # the matching pair passes


def test_candidates_that_tokenize_alike_are_refused(tmp_path):
    folder = save_tiny_model(tmp_path / "model")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    with pytest.raises(UserError, match="tokenize to the same ids"):
        Scorer(tiny_model("llama"), tokenizer, ["good", "good"])
    with pytest.raises(UserError, match="tokenize to the same ids"):  # both unknown words: one [UNK] id
        Scorer(tiny_model("llama"), tokenizer, ["zzzq", "qqqz"])
    Scorer(tiny_model("llama"), tokenizer, ["good", "fun"])


def test_an_empty_test_pool_is_refused(tmp_path):
    from zotune import tasks
    from zotune.recipe.config import from_mapping

    from ..conftest import DATA

    empty = tmp_path / "empty.csv"
    empty.write_text("text,label\n")
    config = from_mapping(dict(task="csv", data=str(DATA / "reviews.csv"), test_data=str(empty),
                               candidates="neg=terrible,pos=great", n_train=4, n_dev=0, n_test=4))
    try:
        task = tasks.build_task(config)
    except UserError:
        return  # refused already when the file is read: as good
    with pytest.raises(UserError, match="no test examples"):
        tasks.sample(task, 4, 0, 4, 0)


def test_an_output_that_cannot_be_written_is_one_line(tiny_model_dir, tmp_path, capsys):
    from zotune import cli
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    args = ["train", "--model", str(tiny_model_dir), "--output", str(blocker / "run"), "--steps", "1",
            "--no-progress"]
    assert cli.main(args) == 2
    error = capsys.readouterr().err
    assert "cannot write the run folder" in error and "Traceback" not in error
