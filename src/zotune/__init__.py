"""zotune: fine-tune large language models when GPU memory is the limit."""

from zotune.core.directions import Dense, Direction, LowRank
from zotune.core.es import ES
from zotune.core.optim import MeZO, decay_groups, replay
from zotune.core.trajectory import Trajectory, TrajectoryStep

__version__ = "0.1.0"

# Loaded on first use: importing the core (``import zotune.core``) runs this file, and must not load the methods.
_METHODS = {"HZO": "zotune.methods.hzo", "LMAO": "zotune.methods.lmao", "ZOTrainer": "zotune.integrations.trainer",
            "read_run": "zotune.recipe.report"}


def __getattr__(name: str):
    if name in _METHODS:
        import importlib

        value = globals()[name] = getattr(importlib.import_module(_METHODS[name]), name)
        return value
    raise AttributeError(f"module 'zotune' has no attribute {name!r}")

__all__ = [
    "HZO",
    "LMAO",
    "Dense",
    "ES",
    "Direction",
    "LowRank",
    "MeZO",
    "Trajectory",
    "TrajectoryStep",
    "ZOTrainer",
    "decay_groups",
    "read_run",
    "replay",
    "__version__",
]
