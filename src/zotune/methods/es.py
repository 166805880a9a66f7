"""ES: evolution strategies on all weights, for rewards that have no gradient (issue 26).

Each step decodes the step's prompts under a population of perturbed copies of the model
(antithetic pairs, all copies in one batch by default), scores each copy's answers with the
run's reward, and moves the weights towards the better copies (:class:`zotune.core.es.ES`).
Low-rank directions (the default) perturb each layer's output, so a copy costs a rank-r
product per layer instead of a weight-sized perturbation; dense ones are exact too, at the
price of one perturbed weight per layer and copy during each forward.
"""

from __future__ import annotations

from dataclasses import dataclass

from zotune.core.directions import LowRank
from zotune.core.es import ES
from zotune.core.estimate import SHAPINGS
from zotune.core.optim import decay_groups, replay
from zotune.methods.footprint import Footprint, Row
from zotune.methods.registry import Method, MethodConfig, check_positive, option, save_model, settings_errors
from zotune.errors import UserError

DIRECTIONS = ("lowrank", "gaussian", "rademacher")


@dataclass
class ESConfig(MethodConfig):
    lr_zo: float = option(1e-5, "the ES step α: W <- W + α Σ r̃_i z_i / (population σ)")
    sigma: float = option(1e-3, "perturbation scale σ")
    population: int = option(8, "perturbed copies a step: antithetic pairs ±z, so an even number")
    shaping: str = option("ranks", "how the population's rewards are normalised: ranks (centred ranks in "
                          "[-0.5, 0.5]) or zscore ((r - mean) / std)", choices=tuple(SHAPINGS))
    direction: str = option("lowrank", "direction of the perturbations: lowrank (U Vᵀ per matrix, applied to the "
                            "layer's output), or dense gaussian or rademacher", choices=DIRECTIONS)
    rank: int = option(4, "rank of lowrank directions")
    resample_every: int = option(1, "lowrank: steps between two draws of V (U is fresh for every copy)")
    stacked: bool = option(True, "decode the whole population in one batch (activation memory grows with it); "
                           "--no-stacked decodes the copies one after another")
    stochastic_rounding: bool = option(True, "round bf16/fp16 weight updates stochastically (unbiased) rather than "
                                       "to nearest")
    materialize: bool = option(False, "with --no-stacked: build each copy's perturbed weights once for its whole "
                               "decoding (one more copy of the weights in memory) instead of at every token; the "
                               "fast way to decode dense directions")

    def __post_init__(self):
        super().__post_init__()
        check_positive(self, "lr_zo", "sigma", "population", "rank", "resample_every")
        if self.materialize and self.stacked:
            raise UserError("--materialize builds one copy's weights at a time: add --no-stacked")
        if self.population % 2:
            raise UserError(f"--population counts antithetic pairs (+z and -z): give an even number, not "
                            f"{self.population}")

    def direction_object(self):
        if self.direction == "lowrank":
            return LowRank(rank=self.rank, interval=self.resample_every)
        return self.direction


class ESMethod(Method):
    """Evolution strategies: a population of perturbed copies decoded in one batch, scored by a reward.

    The run exports ``model/`` and ``trajectory.json``, from which ``zotune replay``
    rebuilds it bit for bit.
    """

    replays = "model"
    gradient_free = True
    default_objective = "reward"

    def __init__(self, model, config: ESConfig, seed: int = 0, steps: int = 1):
        super().__init__(model, config, seed, steps)
        with settings_errors():
            self.zo = ES(decay_groups(model.named_parameters(), config.weight_decay), lr=config.lr_zo,
                         sigma=config.sigma, population=config.population, shaping=config.shaping,
                         direction=config.direction_object(), seed=seed,
                         stochastic_rounding=config.stochastic_rounding, stacked=config.stacked,
                         materialize=config.materialize)
        self.optimizer = self.zo

    def step(self, loss_fn) -> dict:
        self.model.eval()
        reward = self.zo.step(lambda *copies: -loss_fn(*copies))  # the objective is minimised, ES maximises
        record = {"reward": reward, "loss": -reward, "lr": self.zo.param_groups[0]["lr"]}
        stats = getattr(loss_fn, "stats", None)
        if stats:
            record["generated_tokens"] = stats["tokens"]
        return record

    def export(self, folder, model, tokenizer) -> None:
        self.zo.trajectory.save(folder / "trajectory.json")
        save_model(folder / "model", model, tokenizer)

    @classmethod
    def replay(cls, model, config: ESConfig, trajectory):
        replay(decay_groups(model.named_parameters(), config.weight_decay), trajectory)
        return model

    @classmethod
    def memory_estimates(cls, footprint: Footprint) -> dict[str, Row]:
        # The population decodes as one batch of population x batch rows: its forward's working set and its KV
        # cache (counted with every head: an upper bound for grouped-query attention); the low-rank factors are
        # r (m + n) a matrix and copy, small beside them.
        # Decoding keeps the logits of the last position alone.
        f = footprint
        rows = ESConfig.population * f.batch
        tokens = rows * f.length
        working = max(tokens * (4 * f.shape.hidden + 2 * f.shape.ffn) * f.d, f.logits_of(rows))
        kv_cache = tokens * f.shape.blocks * 2 * f.shape.hidden * f.d
        return {"es": Row(f.weights + working + kv_cache)}
