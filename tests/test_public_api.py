"""What ``import zotune`` offers, and what importing the core costs."""

import subprocess
import sys

import zotune
from zotune.recipe.train import train

from .recipe.test_train import config

PUBLIC = ["Dense", "Direction", "ES", "HZO", "LMAO", "LowRank", "MeZO", "Trajectory", "TrajectoryStep", "ZOTrainer",
          "__version__", "decay_groups", "read_run", "replay"]


def test_the_public_api_is_this_list_and_every_name_resolves():
    assert sorted(zotune.__all__) == sorted(PUBLIC)
    for name in PUBLIC:
        assert getattr(zotune, name) is not None


def test_importing_the_core_loads_no_method_transformers_or_peft():
    code = ("import sys, zotune.core, zotune.core.optim; "
            "print(' '.join(m for m in ('zotune.methods', 'transformers', 'peft') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == ""


def test_read_run_gives_a_run_folders_config_result_and_rows(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    result = train(config(tiny_model_dir, out, method="mezo", lr_zo=1e-3, steps=2, zero_shot=False))
    run = zotune.read_run(out)
    assert run["config"].method == "mezo" and run["config"].options.lr_zo == 1e-3
    assert run["result"] == result and [row["step"] for row in run["rows"] if "loss" in row] == [1, 2]
