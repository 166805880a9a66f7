"""Training methods: each is one module (a Config dataclass and a Method class) plus one
``register`` line below. The recipe, evaluation/replay, the CLI and the bench read the
registry, so nothing else changes when a method is added."""

from zotune.methods.first_order import FT, FTConfig, LoRAConfig, LoRAFT, LoRAFTConfig
from zotune.methods.hzo import HZO, HZOConfig, HZOMethod
from zotune.methods.lmao import LMAO, LMAOConfig, LMAOMethod
from zotune.methods.mezo import MeZOConfig, MeZOMethod, ZOConfig
from zotune.methods.registry import METHODS, Entry, Method, MethodConfig, describe, get, names, option, register

register("mezo", MeZOConfig, MeZOMethod)
register("ft", FTConfig, FT)
register("lora-ft", LoRAFTConfig, LoRAFT)
register("lmao", LMAOConfig, LMAOMethod)
register("hzo", HZOConfig, HZOMethod)

__all__ = ["FT", "FTConfig", "HZO", "HZOConfig", "HZOMethod", "LMAO", "LMAOConfig", "LMAOMethod", "LoRAConfig", "LoRAFT", "LoRAFTConfig", "METHODS",
           "Entry", "MeZOConfig", "MeZOMethod", "Method", "MethodConfig", "ZOConfig", "describe", "get", "names",
           "option", "register"]
