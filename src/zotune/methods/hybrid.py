"""The surface that LMAO and HZO share: a first-order optimizer ``fo`` and a zeroth-order
one ``zo`` (:class:`zotune.MeZO`) behind one ``step``/``state_dict`` object."""

from __future__ import annotations


class Hybrid:
    fo = None  # a torch.optim.Optimizer, or None when nothing trains by first order
    zo = None  # a zotune.MeZO

    @property
    def parallel(self):
        """The zotune.engine.distributed.Parallel of a multi-process run (the zeroth-order part's)."""
        return self.zo.parallel

    @parallel.setter
    def parallel(self, parallel) -> None:
        self.zo.parallel = parallel

    @property
    def steps_done(self) -> int:
        return self.zo.steps_done

    @property
    def trajectory(self):
        """The zeroth-order part's trajectory: it rebuilds that part from the initial weights."""
        return self.zo.trajectory

    @property
    def last_step(self):
        return self.zo.last_step

    @property
    def param_groups(self) -> list[dict]:
        return (self.fo.param_groups if self.fo is not None else []) + self.zo.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self.fo is not None:
            self.fo.zero_grad(set_to_none=set_to_none)
