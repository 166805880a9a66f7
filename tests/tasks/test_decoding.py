"""Population decoding: a batch of perturbed copies decodes as each copy would alone."""

import pytest
import torch

from zotune.assets import models
from zotune.core.directions import Draw, LowRank
from zotune.core.perturb import Perturbation, PerturbedParam, StackedPerturbation
from zotune.core.rng import derive_seed
from zotune.tasks import decoding
from zotune.tasks.scoring import Scorer

from ..conftest import save_tiny_model

PROMPTS = ["the film is good . It was", "a dull story", "it was", "the plot is weak and"]


@pytest.fixture(scope="module")
def scorer(tmp_path_factory):
    model, tokenizer, kind = models.load(str(save_tiny_model(tmp_path_factory.mktemp("decoding"))), device="cpu")
    return Scorer(model.double(), tokenizer, [], kind, max_length=32, max_new_tokens=6)


def test_greedy_decoding_matches_generate(scorer):
    prepared = decoding.prepare(scorer, PROMPTS)
    assert decoding.decode(scorer, prepared) == scorer.generate(PROMPTS)


@pytest.mark.parametrize("copies", [2, 4])
def test_a_stacked_population_decodes_as_each_copy_alone(scorer, copies):
    params = [PerturbedParam(p, name, LowRank(rank=2, interval=1)) for name, p in scorer.model.named_parameters()]
    plan = [(Draw(5, 0, derive_seed(5, 0, k // 2)), 0.5 * (1 if k % 2 == 0 else -1)) for k in range(copies)]
    prepared = decoding.prepare(scorer, PROMPTS)
    with torch.no_grad(), StackedPerturbation(params, plan):
        together = decoding.decode(scorer, prepared, copies)
    alone = []
    for draw, eps in plan:
        with torch.no_grad(), Perturbation(params, draw, eps):
            alone += decoding.decode(scorer, prepared)
    assert together == alone
    members = [tuple(together[k * len(PROMPTS):(k + 1) * len(PROMPTS)]) for k in range(copies)]
    assert len(set(members)) > 1  # the perturbations change what the copies say
    assert members[0] != tuple(decoding.decode(scorer, prepared))


def test_sampling_is_seeded_and_shared_by_the_copies(scorer):
    prepared = decoding.prepare(scorer, PROMPTS)

    def sample(seed, copies=1):
        return decoding.decode(scorer, prepared, copies, temperature=2.0, generator=torch.Generator().manual_seed(seed))

    first = sample(0)
    assert sample(0) == first and sample(1) != first
    assert sample(0, copies=3) == first * 3  # unperturbed copies draw the same random numbers


def test_rows_stop_at_the_models_end_of_sequence(scorer):
    prepared = decoding.prepare(scorer, PROMPTS)
    free = decoding.decode(scorer, prepared)
    assert free[0].split()[:2] == ["terrible", "dull"]
    config = scorer.model.generation_config
    saved = config.eos_token_id
    config.eos_token_id = scorer.tokenizer.convert_tokens_to_ids("dull")
    try:
        stopped = decoding.decode(scorer, prepared)
    finally:
        config.eos_token_id = saved
    assert stopped[:3] == ["terrible", free[1], free[2]]  # the others never said "dull"
