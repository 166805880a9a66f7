"""Candidate scoring (MeZO protocol): the score of a candidate is its mean per-token
log-likelihood after the prompt; the prediction is the best-scoring candidate and the
training loss is the cross-entropy over the candidates' scores."""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from zotune.errors import UserError


def _forward_accepts(model, name: str) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return name in inspect.signature(base.forward).parameters


class Scorer:
    """Scores the candidates of a task with a causal LM (candidate tokens follow the
    prompt) or a masked LM (one mask token after the prompt; single-token candidates)."""

    def __init__(self, model, tokenizer, candidates: list[str], kind: str = "causal", max_length: int = 256):
        self.model, self.tokenizer, self.kind, self.max_length = model, tokenizer, kind, max_length
        self.candidate_ids = [tokenizer(" " + word, add_special_tokens=False)["input_ids"] for word in candidates]
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
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.logits_to_keep = _forward_accepts(model, "logits_to_keep")
        self.position_ids = _forward_accepts(model, "position_ids")

    @property
    def device(self):
        return next(self.model.parameters()).device

    def scores(self, prompts: list[str], copies: int = 1) -> torch.Tensor:
        """[copies * len(prompts), n_candidates] mean log-likelihoods (differentiable when grad is on);
        ``copies`` repeats the batch along dim 0, copy-major (stacked zeroth-order evaluation)."""
        if self.kind == "masked":
            return self._masked_scores(prompts, copies)
        return self._causal_scores(prompts, copies)

    def loss(self, prompts: list[str], labels: list[int], copies: int | None = None) -> torch.Tensor:
        """The cross-entropy over the candidates; with ``copies``, one loss per copy of the batch."""
        labels = torch.tensor(labels, device=self.device)
        if copies is None:
            return F.cross_entropy(self.scores(prompts), labels)
        each = F.cross_entropy(self.scores(prompts, copies), labels.repeat(copies), reduction="none")
        return each.view(copies, len(prompts)).mean(1)

    def _prompt_ids(self, prompt: str, room: int) -> list[int]:
        ids = self.tokenizer(prompt)["input_ids"]
        return ids[-room:]  # keep the end of a long prompt: the candidate must follow its last words

    def _causal_scores(self, prompts, copies):
        n_cand = len(self.candidate_ids)
        longest = max(len(ids) for ids in self.candidate_ids)
        if longest == 1:  # one forward per prompt scores every single-token candidate at once
            return self._next_token_scores(prompts, copies)
        rows, lengths = [], []
        for prompt in prompts:
            prompt_ids = self._prompt_ids(prompt, self.max_length - longest)
            for cand in self.candidate_ids:
                rows.append(prompt_ids + cand)
                lengths.append(len(cand))
        input_ids, attention = self._pad(rows, left=True, copies=copies)
        lengths = lengths * copies
        keep = longest + 1
        logits = self.model(**self._causal_inputs(input_ids, attention, keep)).logits[:, -keep:].float()
        targets = input_ids[:, -longest:]
        logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        lengths = torch.tensor(lengths, device=logp.device)
        position = torch.arange(longest, device=logp.device)
        on_candidate = position.unsqueeze(0) >= (longest - lengths).unsqueeze(1)
        mean = (logp * on_candidate).sum(1) / lengths
        return mean.view(-1, n_cand)

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
        rows = [self._prompt_ids(p + " " + self.tokenizer.mask_token, self.max_length) for p in prompts]
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


@torch.no_grad()
def evaluate(scorer: Scorer, task, examples, batch_size: int = 32, desc: str = "eval", progress: bool = True) -> dict:
    """Accuracy of argmax-candidate predictions on ``examples``."""
    was_training = scorer.model.training
    scorer.model.eval()
    correct = 0
    try:
        for begin in tqdm(range(0, len(examples), batch_size), desc=desc, leave=False, disable=not progress):
            batch = examples[begin:begin + batch_size]
            predictions = scorer.scores([task.prompt(e) for e in batch]).argmax(1).tolist()
            correct += sum(int(p == e.label) for p, e in zip(predictions, batch))
    finally:
        scorer.model.train(was_training)
    return {"accuracy": correct / max(1, len(examples)), "n": len(examples)}
