"""What training minimises and evaluation reports, from a :class:`~zotune.tasks.scoring.Scorer`.

Training closures (:func:`loss_function`): the cross-entropy over the candidates, the answer's
negative log-likelihood, or for gradient-free methods minus a non-differentiable objective
(accuracy, token F1 of greedy answers, or a reward of decoded answers, a whole population of
perturbed copies in one batch). Evaluation (:func:`evaluate`): accuracy, token F1 and exact
match, or a task's reward.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from zotune.errors import UserError
from zotune.tasks import decoding, rewards
from zotune.tasks.metrics import exact_match, token_f1
from zotune.tasks.scoring import Scorer, to_device


def metric_of(task) -> str:
    """What a task's evaluation reports: its reward if it has one, token F1 for other generation tasks, accuracy
    otherwise."""
    if task.format == "generation":
        return "reward" if task.reward else "f1"
    return "accuracy"


_REWARDS: dict = {}


def reward_of(task):
    """The task's reward function and its name (its own, or exact match against the answers)."""
    name = task.reward or rewards.default_name(task.name)
    if name not in _REWARDS:
        _REWARDS[name] = rewards.load(name)
    return _REWARDS[name], name


def rewards_of(task, examples, prompts, completions) -> list[float]:
    reward, name = reward_of(task)
    return [rewards.score(reward, name, prompt, completion, example)
            for prompt, completion, example in zip(prompts, completions, examples)]


@torch.no_grad()
def evaluate(scorer: Scorer, task, examples, batch_size: int = 32, desc: str = "eval", progress: bool = True,
             parallel=None) -> dict:
    """The task's metric on ``examples``: ``{"metric", "score", "n"}`` plus the metric by name
    (accuracy of argmax-candidate predictions; for generation tasks token F1 and exact match
    ``em`` of greedy answers). With ``parallel`` (a multi-process run) each rank scores its
    share of the examples and every rank gets the totals."""
    n = len(examples)
    if parallel is not None:
        examples = examples[parallel.rank::parallel.world]
    was_training = scorer.model.training
    scorer.model.eval()
    totals = {"accuracy": 0.0} if task.format != "generation" else {"f1": 0.0, "em": 0.0}
    if task.reward:
        totals["reward"] = 0.0
    try:
        for begin in tqdm(range(0, len(examples), batch_size), desc=desc, leave=False, disable=not progress):
            batch = examples[begin:begin + batch_size]
            prompts = [task.prompt(e) for e in batch]
            if task.format == "generation":
                if task.reward:  # decoded the way training decodes (chat template, stop at a newline)
                    answers = decoding.decode(scorer, decoding.prepare(scorer, prompts, task.chat))
                    totals["reward"] += sum(rewards_of(task, batch, prompts, answers))
                else:
                    answers = scorer.generate(prompts)
                for answer, example in zip(answers, batch):
                    totals["f1"] += token_f1(answer, example.answers)
                    totals["em"] += exact_match(answer, example.answers)
                continue
            choices = [task.choices(e) for e in batch] if task.format == "multiple_choice" else None
            predictions = scorer.scores(prompts, choices=choices).argmax(1).tolist()
            totals["accuracy"] += sum(int(e.is_right(p)) for p, e in zip(predictions, batch))
    finally:
        scorer.model.train(was_training)
    if parallel is not None:
        totals = dict(zip(totals, parallel.sum(list(totals.values()))))
    result = {name: value / max(1, n) for name, value in totals.items()}
    metric = metric_of(task)
    return {"metric": metric, "score": result[metric], "n": n, **result}


OBJECTIVES = ("loss", "accuracy", "f1", "reward")


def loss_function(scorer: Scorer, task, examples, objective: str = "loss", temperature: float = 0.0,
                  seed: int | None = None):
    """The training closure of a minibatch, ``fn(copies=None)``: the task's loss (cross-entropy
    over the candidates, or the answer's negative log-likelihood for generation tasks), or
    a non-differentiable objective for zeroth-order methods: minus the accuracy, minus
    the token F1 of greedy answers, or minus the mean reward of decoded answers (greedy, or
    sampled at ``temperature`` from a generator seeded with ``seed``). With ``copies`` it
    returns one value per copy of the batch. The minibatch is tokenized and on the device when
    this returns, so that a step's forwards wait for no host copy."""
    prompts = [task.prompt(e) for e in examples]
    if objective == "reward":
        if task.format != "generation":
            raise UserError(f"--objective reward scores decoded answers; {task.name} has candidates: use a generation "
                            "task (arith, countdown, rt-movie-qa, a jsonl file with answers) or --objective accuracy")
        reward_of(task)  # an unknown or broken --reward is refused before any training
        if not examples:
            return None
        prepared = decoding.prepare(scorer, prompts, task.chat)
        stats = {}

        def minus_reward(copies=None):
            generator = None if seed is None else torch.Generator().manual_seed(seed)
            answers = decoding.decode(scorer, prepared, copies or 1, temperature, generator, stats=stats)
            values = torch.tensor(rewards_of(task, examples * (copies or 1), prompts * (copies or 1), answers),
                                  dtype=torch.float64).view(copies or 1, len(examples))
            means = -values.mean(dim=1)
            return means if copies is not None else means[0]
        minus_reward.stats = stats  # the tokens decoded, for the step's record
        return minus_reward
    if task.format == "generation":
        if objective == "accuracy":
            raise UserError(f"--objective accuracy needs a task with candidates; {task.name} is a generation task: "
                            "use --objective f1")
        if objective == "f1":
            def minus_f1(copies=None):
                if copies is not None:
                    raise UserError("--objective f1 generates one answer set per forward: use --no-stacked "
                                    "(and no --offload)")
                answers = scorer.generate(prompts)
                return -sum(token_f1(a, e.answers) for a, e in zip(answers, examples)) / len(examples)
            return minus_f1
        if not examples:
            return None
        pairs = scorer.prepare_answers(prompts, [e.answers[0] for e in examples])
        return lambda copies=None: scorer.answer_nll(pairs, len(prompts), copies)
    if objective == "f1":
        raise UserError(f"--objective f1 needs a generation task; {task.name} has candidates: use --objective "
                        "accuracy")
    if not examples:
        return None
    choices = [task.choices(e) for e in examples] if task.format == "multiple_choice" else None
    scoring = scorer.prepare(prompts, choices)
    if objective == "accuracy":
        is_right = scorer.right_table([[e.label, *e.also_right] for e in examples], scoring)
        return lambda copies=None: scorer.minus_accuracy(scoring, is_right, copies)
    labels = to_device(torch.tensor([e.label for e in examples]), scorer.device)
    return lambda copies=None: scorer.cross_entropy(scoring, labels, copies)
