"""Training methods: each is one module (a Config dataclass and a Method class) plus one
``register`` line below. The recipe, evaluation/replay, the CLI and the bench read the
registry, so nothing else changes when a method is added."""

from zotune.methods.adapters import LoRAConfig
from zotune.methods.es import ESConfig, ESMethod
from zotune.methods.first_order import FT, FTConfig, LoRAFT, LoRAFTConfig
from zotune.methods.hzo import HZO, HZOConfig, HZOMethod
from zotune.methods.lmao import LMAO, LMAOConfig, LMAOMethod
from zotune.methods.mezo import MeZOConfig, MeZOMethod, ZOConfig
from zotune.methods.registry import (METHODS, RATES, Entry, Method, MethodConfig, build, describe, get, make_config,
                                     names, option, register, renames, upgrade)

# The order (least memory first) is that of help texts and bench rows.
register("mezo", MeZOConfig, MeZOMethod)
register("es", ESConfig, ESMethod)
register("lmao", LMAOConfig, LMAOMethod)
register("hzo", HZOConfig, HZOMethod)
register("lora-ft", LoRAFTConfig, LoRAFT)
register("ft", FTConfig, FT)
DEFAULT = "mezo"  # the method of zotune train and ZOTrainer when none is named: inference memory

__all__ = ["DEFAULT", "ESConfig", "ESMethod", "FT", "FTConfig", "HZO", "HZOConfig", "HZOMethod", "LMAO", "LMAOConfig", "LMAOMethod", "LoRAConfig",
           "LoRAFT", "LoRAFTConfig", "METHODS", "RATES", "Entry", "MeZOConfig", "MeZOMethod", "Method", "MethodConfig",
           "ZOConfig", "build", "describe", "get", "make_config", "names", "option", "register", "renames", "upgrade"]
