"""What a candidate head reads, kept per training prompt: with ``--peft head`` nothing before the head trains, so the
frozen model need read each training prompt once in a whole run, not once a step.

:meth:`HeadFeatures.fill` runs the model over the prompts in fixed minibatches (their order and grouping depend on
the prompts alone, so a resumed run refills the same numbers) and keeps, per prompt, the hidden state the head
reads, the wrapped output layer's logits on the head's tokens and the log-sum-exp of its whole row, in host memory
(about one hidden state per example). :meth:`scores` then gives the candidates' log-likelihoods for any Δ and b
with no forward: only the head's tokens change, so the row's normaliser is the old one plus their change,

    lse' = lse + log1p(Σ_t exp(z'_t − lse) − exp(z_t − lse)),

in float64. Single-token candidates only (next-token and masked scoring): a multi-token candidate reads the head
at several positions, and those tasks keep one forward a step.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from zotune.core.head import CandidateHead
from zotune.tasks.scoring import Scorer, to_device

CACHED_MODES = ("next-token", "masked")
SCALE_PROMPTS = 512  # training prompts a head measures its feature scale on (--head-scale prompts)


class HeadFeatures:
    def __init__(self, scorer: Scorer, head: CandidateHead):
        self.scorer, self.head = scorer, head
        self.rows: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    @torch.no_grad()
    def fill(self, prompts: list[str], batch_size: int, progress: bool = True) -> bool:
        """Reads ``prompts`` once; False (and nothing kept) when the task's scoring reads the head elsewhere than
        one position per prompt, or the scorer keeps no record of a forward (``Scorer.record``)."""
        unique = list(dict.fromkeys(prompts))
        for start in tqdm(range(0, len(unique), batch_size), desc="features", disable=not progress, leave=False):
            chunk = unique[start:start + batch_size]
            scoring = self.scorer.prepare(chunk)
            record = self.scorer.record(scoring) if scoring.mode in CACHED_MODES else None
            if record is None:
                self.rows.clear()
                return False
            hidden, base = record
            rows = torch.arange(len(chunk), device=hidden.device)
            at = torch.full_like(rows, hidden.shape[1] - 1) if scoring.mode == "next-token" else scoring.position
            hidden, base = hidden[rows, at], base[rows, at].double()
            kept = base[:, self.head.token_ids]
            lse = torch.logsumexp(base, dim=-1)
            for i, prompt in enumerate(chunk):
                self.rows[prompt] = (hidden[i].cpu(), kept[i].cpu(), lse[i].cpu())
        return True

    def hidden_states(self, limit: int | None = None) -> torch.Tensor:
        """[prompts, features]: what the head reads, for the first ``limit`` prompts read."""
        return torch.stack([row[0] for row in list(self.rows.values())[:limit]])

    def covers(self, prompts) -> bool:
        return bool(self.rows) and prompts is not None and all(p in self.rows for p in prompts)

    def scores(self, prompts: list[str], columns: torch.Tensor) -> torch.Tensor:
        """[prompts, candidates] mean log-likelihoods under the head's current Δ and b, as ``Scorer.score`` gives
        them (to float rounding)."""
        device = self.head.delta.device
        hidden = to_device(torch.stack([self.rows[p][0] for p in prompts]), device)
        base = to_device(torch.stack([self.rows[p][1] for p in prompts]), device)
        lse = to_device(torch.stack([self.rows[p][2] for p in prompts]), device).unsqueeze(1)
        corrected = self.head(hidden, base, compact=True)  # a module call: a perturbation of Δ and b is seen
        shift = ((corrected - lse).exp() - (base - lse).exp()).sum(1, keepdim=True)
        logp = corrected - (lse + torch.log1p(shift))
        return logp[:, torch.searchsorted(self.head.token_ids, columns)].float()
