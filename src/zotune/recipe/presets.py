"""Named presets: a method with settings measured to work, under one name (``--preset``).

A preset is a bundle of flat options (run fields and method options alike, such as the
batch size a method needs); options given beside it, on the command line or in a config
file, override its values. A run folder's ``config.yaml`` records every value the preset
set, so a run reads the same after a preset changes.
"""

from __future__ import annotations

from dataclasses import dataclass

from zotune.errors import UserError, unknown

NONE = "none"


@dataclass(frozen=True)
class Preset:
    name: str
    values: dict  # flat options, "method" among them
    help: str
    source: str  # where its numbers come from


PRESETS = {preset.name: preset for preset in (
    Preset("mezo-paper", dict(method="mezo", batch_size=16, lr_zo=1e-6, eps=1e-3, direction="gaussian",
                              estimator="spsa", n_samples=1, momentum=0.0),
           "MeZO's published settings (OPT-13B; constant lr 1e-6, eps 1e-3, batch 16, one Gaussian direction): "
           "slow on small models, kept to reproduce the paper",
           "Malladi et al. 2023, methods.md §1"),
    Preset("mezo-head", dict(method="mezo", peft="head", head_layer=0.67, n_samples=64, lr_zo=3e-3, eps=1e-2,
                             batch_size=16),
           "forward-only on a classification task: zeroth order on a correction of the output layer's "
           "candidate-word rows that reads the block at two thirds of the depth (a linear probe of the frozen "
           "model), 64 directions a step on features read once; the fastest forward-only recipe on rt-sst2 "
           "(BENCHMARKS.md, forward-only convergence)",
           "benchmarks/convergence.py, BENCHMARKS.md"),
)}


def names() -> tuple[str, ...]:
    return (NONE, *PRESETS)


def describe() -> str:
    return "a named bundle of settings, overridden by options given beside it: " + "; ".join(
        f"{p.name} ({p.help})" for p in PRESETS.values())


def apply(values: dict) -> dict:
    """``values`` on top of their preset's (if they name one); refuses a preset given with another method."""
    name = values.get("preset", NONE)
    if name in (None, NONE):
        return values
    if name not in PRESETS:
        raise UserError(unknown("preset", name, PRESETS))
    preset = PRESETS[name]
    method = values.get("method", preset.values["method"])
    if method != preset.values["method"]:
        raise UserError(f"--preset {name} is a {preset.values['method']} preset, not one for --method {method}: "
                        f"leave out --method or --preset")
    return {**preset.values, **values}
