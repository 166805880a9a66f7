"""zotune: fine-tune large language models when GPU memory is the limit."""

from zotune.directions import direction, fill
from zotune.lmao import LMAO
from zotune.mezo import MeZO
from zotune.perturb import Perturbation
from zotune.trajectory import Trajectory, TrajectoryStep, replay

__version__ = "0.1.0"

__all__ = [
    "LMAO",
    "MeZO",
    "Perturbation",
    "Trajectory",
    "TrajectoryStep",
    "direction",
    "fill",
    "replay",
    "__version__",
]
