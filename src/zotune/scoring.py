"""Candidate scoring (MeZO protocol): the score of a candidate is its mean per-token
log-likelihood after the prompt; the prediction is the best-scoring candidate and the
training loss is the cross-entropy over the candidates' scores."""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from zotune.errors import UserError
from zotune.metrics import exact_match, token_f1


def _forward_accepts(model, name: str) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return name in inspect.signature(base.forward).parameters


class Scorer:
    """Scores the candidates of a task with a causal LM (candidate tokens follow the
    prompt) or a masked LM (one mask token after the prompt; single-token candidates).

    ``candidates`` are the task's words; multiple-choice tasks give each prompt its own
    (``choices``) and generation tasks none: their answers are scored by
    :meth:`answer_loss` and produced by :meth:`generate` (greedy, causal LMs only).
    """

    def __init__(self, model, tokenizer, candidates: list[str], kind: str = "causal", max_length: int = 256,
                 max_new_tokens: int = 16, separator: str = " "):
        self.model, self.tokenizer, self.kind, self.max_length = model, tokenizer, kind, max_length
        self.max_new_tokens, self.separator = max_new_tokens, separator
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.logits_to_keep = _forward_accepts(model, "logits_to_keep")
        self.position_ids = _forward_accepts(model, "position_ids")
        self.candidate_ids = [self._continuation(word) for word in candidates]
        if not candidates:
            return
        if any(not ids for ids in self.candidate_ids):
            raise UserError(f"a candidate in {candidates} tokenizes to nothing: use non-empty words")
        # Scored by their first token when all are one token long (and always for masked LMs).
        keys = [tuple(ids) if max(map(len, self.candidate_ids)) > 1 and kind != "masked" else ids[0]
                for ids in self.candidate_ids]
        for i, key in enumerate(keys):
            if key in keys[:i]:
                other = candidates[keys.index(key)]
                raise UserError(f"candidates {other!r} and {candidates[i]!r} tokenize to the same ids, so they always "
                                "tie: choose words that differ")
        if kind == "masked":
            if tokenizer.mask_token_id is None:
                raise UserError("the model is a masked LM but its tokenizer has no mask token")
            long = [w for w, ids in zip(candidates, self.candidate_ids) if len(ids) != 1]
            if long:
                raise UserError(f"masked LMs need single-token candidates; {long} are longer: pick other words")

    def _continuation(self, text: str) -> list[int]:
        return self.tokenizer(self.separator + text, add_special_tokens=False)["input_ids"]

    @property
    def device(self):
        return next(self.model.parameters()).device

    def scores(self, prompts: list[str], copies: int = 1, choices: list[list[str]] | None = None) -> torch.Tensor:
        """[copies * len(prompts), n_candidates] mean log-likelihoods (differentiable when grad is on);
        ``copies`` repeats the batch along dim 0, copy-major (stacked zeroth-order evaluation).
        With ``choices`` (each prompt's own candidates) the columns are padded with -inf."""
        if choices is not None:
            return self._choice_scores(prompts, choices, copies)
        if self.kind == "masked":
            return self._masked_scores(prompts, copies)
        return self._causal_scores(prompts, copies)

    def loss(self, prompts: list[str], labels: list[int], copies: int | None = None,
             choices: list[list[str]] | None = None) -> torch.Tensor:
        """The cross-entropy over the candidates; with ``copies``, one loss per copy of the batch."""
        labels = torch.tensor(labels, device=self.device)
        if copies is None:
            return F.cross_entropy(self.scores(prompts, choices=choices), labels)
        each = F.cross_entropy(self.scores(prompts, copies, choices), labels.repeat(copies), reduction="none")
        return each.view(copies, len(prompts)).mean(1)

    def accuracy_loss(self, prompts: list[str], right: list[list[int]], copies: int | None = None,
                      choices: list[list[str]] | None = None) -> torch.Tensor:
        """Minus the minibatch accuracy (a zeroth-order objective: no gradient needed);
        ``right[i]`` lists the candidates that count as right for prompt i."""
        scores = self.scores(prompts, copies or 1, choices)
        predicted = scores.argmax(1).view(copies or 1, len(prompts))
        is_right = torch.zeros(len(prompts), scores.shape[1], dtype=torch.bool, device=predicted.device)
        for row, columns in enumerate(right):
            is_right[row, columns] = True
        hits = is_right.gather(1, predicted.T).T.float().mean(1)
        return -hits if copies is not None else -hits[0]

    def answer_loss(self, prompts: list[str], answers: list[str], copies: int | None = None) -> torch.Tensor:
        """Generation tasks: the mean negative log-likelihood of each answer's tokens (and the
        newline that ends it) after its prompt, averaged over the batch."""
        self._need_causal("generation tasks")
        targets = [self._continuation(answer) + self._newline() for answer in answers]
        logp = -self._pair_logp([self._prompt_ids(p, self.max_length - len(t)) for p, t in zip(prompts, targets)],
                                targets, copies or 1)
        return logp.view(copies or 1, len(prompts)).mean(1) if copies is not None else logp.mean()

    @torch.no_grad()
    def generate(self, prompts: list[str]) -> list[str]:
        """Greedy continuations of ``prompts``, cut at the first newline."""
        self._need_causal("generation tasks")
        room = self.max_length - self.max_new_tokens
        input_ids, attention = self._pad([self._prompt_ids(p, room) for p in prompts], left=True)
        output = self.model.generate(input_ids=input_ids, attention_mask=attention, do_sample=False,
                                     max_new_tokens=self.max_new_tokens, pad_token_id=self.pad_id)
        texts = self.tokenizer.batch_decode(output[:, input_ids.shape[1]:], skip_special_tokens=True)
        return [text.strip().split("\n")[0].strip() for text in texts]

    def _newline(self) -> list[int]:
        ids = self.tokenizer("\n", add_special_tokens=False)["input_ids"]
        return ids[-1:] if ids else []

    def _need_causal(self, what: str) -> None:
        if self.kind == "masked":
            raise UserError(f"{what} need a causal LM; this model is a masked LM")

    def _choice_scores(self, prompts, choices, copies):
        self._need_causal("multiple-choice tasks")
        tokenized = [[self._continuation(c) for c in row] for row in choices]
        prompt_rows, targets = [], []
        for prompt, row in zip(prompts, tokenized):
            prompt_ids = self._prompt_ids(prompt, self.max_length - max(map(len, row)))
            prompt_rows += [prompt_ids] * len(row)
            targets += row
        flat = self._pair_logp(prompt_rows, targets, copies)
        width = max(map(len, tokenized))
        table = torch.full((copies * len(prompts), width), float("-inf"), device=flat.device, dtype=flat.dtype)
        position = 0
        for copy in range(copies):
            for i, row in enumerate(tokenized):
                table[copy * len(prompts) + i, : len(row)] = flat[position : position + len(row)]
                position += len(row)
        return table

    def _prompt_ids(self, prompt: str, room: int) -> list[int]:
        ids = self.tokenizer(prompt)["input_ids"]
        return ids[-room:]  # keep the end of a long prompt: the candidate must follow its last words

    def _causal_scores(self, prompts, copies):
        n_cand = len(self.candidate_ids)
        longest = max(len(ids) for ids in self.candidate_ids)
        if longest == 1:  # one forward per prompt scores every single-token candidate at once
            return self._next_token_scores(prompts, copies)
        prompt_rows = [self._prompt_ids(p, self.max_length - longest) for p in prompts for _ in range(n_cand)]
        return self._pair_logp(prompt_rows, self.candidate_ids * len(prompts), copies).view(-1, n_cand)

    def _pair_logp(self, prompt_rows: list[list[int]], targets: list[list[int]], copies: int) -> torch.Tensor:
        """[copies * len(targets)] mean log-likelihood of each target's tokens after its prompt."""
        longest = max(map(len, targets))
        rows = [prompt + target for prompt, target in zip(prompt_rows, targets)]
        lengths = [len(target) for target in targets]
        input_ids, attention = self._pad(rows, left=True, copies=copies)
        lengths = lengths * copies
        keep = longest + 1
        logits = self.model(**self._causal_inputs(input_ids, attention, keep)).logits[:, -keep:].float()
        targets = input_ids[:, -longest:]
        logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        lengths = torch.tensor(lengths, device=logp.device)
        position = torch.arange(longest, device=logp.device)
        on_candidate = position.unsqueeze(0) >= (longest - lengths).unsqueeze(1)
        return (logp * on_candidate).sum(1) / lengths

    def _next_token_scores(self, prompts, copies):
        input_ids, attention = self._pad([self._prompt_ids(p, self.max_length - 1) for p in prompts], left=True,
                                         copies=copies)
        logits = self.model(**self._causal_inputs(input_ids, attention, keep=1)).logits[:, -1].float()
        return torch.log_softmax(logits, dim=-1)[:, self._first_tokens(logits.device)]

    def _causal_inputs(self, input_ids, attention, keep: int) -> dict:
        kwargs = dict(input_ids=input_ids, attention_mask=attention)
        if self.position_ids:  # left padding: count positions from each row's first real token
            kwargs["position_ids"] = (attention.cumsum(1) - 1).clamp(min=0)
        if self.logits_to_keep:
            kwargs["logits_to_keep"] = keep
        return kwargs

    def _first_tokens(self, device):
        return torch.tensor([ids[0] for ids in self.candidate_ids], device=device)

    def _masked_scores(self, prompts, copies):
        rows = [self._prompt_ids(p + self.separator + self.tokenizer.mask_token, self.max_length) for p in prompts]
        input_ids, attention = self._pad(rows, left=False, copies=copies)
        logits = self.model(input_ids=input_ids, attention_mask=attention).logits
        at_mask = input_ids == self.tokenizer.mask_token_id
        # The mask we appended is the last one in each row.
        position = (at_mask * torch.arange(input_ids.shape[1], device=input_ids.device)).argmax(1)
        mask_logits = logits[torch.arange(input_ids.shape[0], device=logits.device), position].float()
        return torch.log_softmax(mask_logits, dim=-1)[:, self._first_tokens(logits.device)]

    def _pad(self, rows, left: bool, copies: int = 1):
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            span = slice(width - len(row), width) if left else slice(0, len(row))
            ids[i, span] = torch.tensor(row)
            attention[i, span] = 1
        return ids.repeat(copies, 1).to(self.device), attention.repeat(copies, 1).to(self.device)


def metric_of(task) -> str:
    """What a task's evaluation reports: token F1 for generation, accuracy otherwise."""
    return "f1" if task.format == "generation" else "accuracy"


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
    try:
        for begin in tqdm(range(0, len(examples), batch_size), desc=desc, leave=False, disable=not progress):
            batch = examples[begin:begin + batch_size]
            prompts = [task.prompt(e) for e in batch]
            if task.format == "generation":
                for answer, example in zip(scorer.generate(prompts), batch):
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


OBJECTIVES = ("loss", "accuracy", "f1")


def loss_function(scorer: Scorer, task, examples, objective: str = "loss"):
    """The training closure of a minibatch, ``fn(copies=None)``: the task's loss (cross-entropy
    over the candidates, or the answer's negative log-likelihood for generation tasks), or
    a non-differentiable objective for zeroth-order methods: minus the accuracy, or minus
    the token F1 of greedy answers."""
    prompts = [task.prompt(e) for e in examples]
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
        answers = [e.answers[0] for e in examples]
        return lambda copies=None: scorer.answer_loss(prompts, answers, copies)
    if objective == "f1":
        raise UserError(f"--objective f1 needs a generation task; {task.name} has candidates: use --objective "
                        "accuracy")
    choices = [task.choices(e) for e in examples] if task.format == "multiple_choice" else None
    if objective == "accuracy":
        right = [[e.label, *e.also_right] for e in examples]
        return lambda copies=None: scorer.accuracy_loss(prompts, right, copies, choices)
    labels = [e.label for e in examples]
    return lambda copies=None: scorer.loss(prompts, labels, copies, choices)
