"""What ``import zotune`` offers, and what importing the core costs."""

import subprocess
import sys

import zotune

PUBLIC = ["Dense", "Direction", "HZO", "LMAO", "LowRank", "MeZO", "Trajectory", "TrajectoryStep", "ZOTrainer",
          "__version__", "decay_groups", "replay"]


def test_the_public_api_is_this_list_and_every_name_resolves():
    assert sorted(zotune.__all__) == sorted(PUBLIC)
    for name in PUBLIC:
        assert getattr(zotune, name) is not None


def test_importing_the_core_loads_no_method_transformers_or_peft():
    code = ("import sys, zotune.core, zotune.core.optim; "
            "print(' '.join(m for m in ('zotune.methods', 'transformers', 'peft') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == ""
