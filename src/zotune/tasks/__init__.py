"""Tasks: examples and formats (:mod:`.examples`), the catalogue that ``--task`` names
(:mod:`.catalogue`: files, the offline built-ins of :mod:`.offline`, the MeZO paper's tasks of
:mod:`.hub`), candidate scoring, losses and evaluation (:mod:`.scoring`) and metrics."""

from zotune.tasks.catalogue import TASKS, build_task
from zotune.tasks.examples import FORMATS, Example, Split, Task, fixed_split, parse_candidates, sample

__all__ = ["FORMATS", "TASKS", "Example", "Split", "Task", "build_task", "fixed_split", "parse_candidates", "sample"]
