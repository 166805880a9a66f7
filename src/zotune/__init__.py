"""zotune: fine-tune large language models when GPU memory is the limit."""

from zotune.core.directions import Dense, Direction, LowRank
from zotune.core.optim import MeZO, decay_groups, replay
from zotune.core.trajectory import Trajectory, TrajectoryStep
from zotune.methods.hzo import HZO
from zotune.methods.lmao import LMAO

__version__ = "0.1.0"

__all__ = [
    "HZO",
    "LMAO",
    "Dense",
    "Direction",
    "LowRank",
    "MeZO",
    "Trajectory",
    "TrajectoryStep",
    "decay_groups",
    "replay",
    "__version__",
]
