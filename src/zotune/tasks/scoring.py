"""Candidate scoring (MeZO protocol): the score of a candidate is its mean per-token
log-likelihood after the prompt; the prediction is the best-scoring candidate and the
training loss is the cross-entropy over the candidates' scores."""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from zotune.core.head import find_head
from zotune.engine.offload import device_of
from zotune.errors import UserError


def _forward_accepts(model, name: str) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return name in inspect.signature(base.forward).parameters


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` (host memory) on ``device``: from pinned memory without blocking the host on a GPU."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def continuation_ids(tokenizer, text: str, separator: str = " ") -> list[int]:
    """The tokens of ``text`` as it follows a prompt (after ``separator``)."""
    return tokenizer(separator + text, add_special_tokens=False)["input_ids"]


@dataclass
class Pairs:
    """Rows of prompt + target tokens, left-padded, on the device: each row ends with its target."""

    ids: torch.Tensor
    attention: torch.Tensor
    on_target: torch.Tensor  # [rows, longest] 1.0 on the target's tokens
    lengths: torch.Tensor  # [rows] target lengths, float
    longest: int
    trunk: tuple | bool | None = None  # see Scorer._logits


@dataclass
class Scoring:
    """A minibatch's scoring inputs, on the device, built before a step so that its forwards
    copy nothing from the host. ``mode``: next-token, pairs, choices or masked."""

    mode: str
    prompts: int
    ids: torch.Tensor | None = None
    attention: torch.Tensor | None = None
    pairs: Pairs | None = None
    columns: torch.Tensor | None = None  # next-token and masked: the candidates' first tokens
    position: torch.Tensor | None = None  # masked: each row's mask position
    table: torch.Tensor | None = None  # choices: [prompts, width] index into the flat scores (or the -inf slot)
    trunk: tuple | bool | None = None  # see Scorer._logits
    texts: list[str] | None = None  # next-token and masked: the prompts (keys of Scorer.features)


class Scorer:
    """Scores the candidates of a task with a causal LM (candidate tokens follow the
    prompt) or a masked LM (one mask token after the prompt; single-token candidates).

    ``candidates`` are the task's words; multiple-choice tasks give each prompt its own
    (``choices``) and generation tasks none: their answers are scored by
    :meth:`answer_loss` and produced by :meth:`generate` (greedy, causal LMs only).

    Training closures (:func:`loss_function`) tokenize and move their minibatch to the
    device once, when they are built; inside a step a forward reads only device tensors.
    """

    def __init__(self, model, tokenizer, candidates: list[str], kind: str = "causal", max_length: int = 256,
                 max_new_tokens: int = 16, separator: str = " "):
        self.model, self.tokenizer, self.kind, self.max_length = model, tokenizer, kind, max_length
        self.max_new_tokens, self.separator = max_new_tokens, separator
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.logits_to_keep = _forward_accepts(model, "logits_to_keep")
        self.position_ids = _forward_accepts(model, "position_ids")
        self.use_cache = _forward_accepts(model, "use_cache")
        self.candidate_ids = [self._continuation(word) for word in candidates]
        self.head = find_head(model)  # --peft head: its evaluations share the frozen trunk's forward
        self.features = None  # --peft head: a tasks.features.HeadFeatures of the training prompts, if filled
        self._columns: dict = {}  # device -> the candidates' first tokens there
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
        return continuation_ids(self.tokenizer, text, self.separator)

    @property
    def device(self) -> torch.device:
        """Where the model computes (not where its first weight is: an offloaded one lives in host memory)."""
        return device_of(self.model)

    # -- the public, one-call forms ------------------------------------------------

    def scores(self, prompts: list[str], copies: int = 1, choices: list[list[str]] | None = None) -> torch.Tensor:
        """[copies * len(prompts), n_candidates] mean log-likelihoods (differentiable when grad is on);
        ``copies`` repeats the batch along dim 0, copy-major (stacked zeroth-order evaluation).
        With ``choices`` (each prompt's own candidates) the columns are padded with -inf."""
        return self.score(self.prepare(prompts, choices), copies)

    def loss(self, prompts: list[str], labels: list[int], copies: int | None = None,
             choices: list[list[str]] | None = None) -> torch.Tensor:
        """The cross-entropy over the candidates; with ``copies``, one loss per copy of the batch."""
        return self.cross_entropy(self.prepare(prompts, choices), to_device(torch.tensor(labels), self.device),
                                  copies)

    def accuracy_loss(self, prompts: list[str], right: list[list[int]], copies: int | None = None,
                      choices: list[list[str]] | None = None) -> torch.Tensor:
        """Minus the minibatch accuracy (a zeroth-order objective: no gradient needed);
        ``right[i]`` lists the candidates that count as right for prompt i."""
        scoring = self.prepare(prompts, choices)
        return self.minus_accuracy(scoring, self.right_table(right, scoring), copies)

    def answer_loss(self, prompts: list[str], answers: list[str], copies: int | None = None) -> torch.Tensor:
        """Generation tasks: the mean negative log-likelihood of each answer's tokens (and the
        newline that ends it) after its prompt, averaged over the batch."""
        return self.answer_nll(self.prepare_answers(prompts, answers), len(prompts), copies)

    @torch.no_grad()
    def generate(self, prompts: list[str]) -> list[str]:
        """Greedy continuations of ``prompts``, cut at the first newline."""
        self._need_causal("generation tasks")
        room = self.max_length - self.max_new_tokens
        input_ids, attention = self._pad([self._prompt_ids(p, room) for p in prompts], left=True)
        input_ids, attention = to_device(input_ids, self.device), to_device(attention, self.device)
        output = self.model.generate(input_ids=input_ids, attention_mask=attention, do_sample=False,
                                     max_new_tokens=self.max_new_tokens, pad_token_id=self.pad_id)
        texts = self.tokenizer.batch_decode(output[:, input_ids.shape[1]:], skip_special_tokens=True)
        return [text.strip().split("\n")[0].strip() for text in texts]

    # -- preparation: host work and one copy per tensor, before a step -------------------

    def prepare(self, prompts: list[str], choices: list[list[str]] | None = None) -> Scoring:
        """The scoring inputs of ``prompts`` (with their own ``choices``), on the device."""
        device = self.device
        if choices is not None:
            self._need_causal("multiple-choice tasks")
            tokenized = [[self._continuation(c) for c in row] for row in choices]
            prompt_rows, targets = [], []
            for prompt, row in zip(prompts, tokenized):
                prompt_ids = self._prompt_ids(prompt, self.max_length - max(map(len, row)))
                prompt_rows += [prompt_ids] * len(row)
                targets += row
            width, flat = max(map(len, tokenized)), len(targets)
            table = torch.full((len(prompts), width), flat, dtype=torch.long)  # flat: the -inf slot
            position = 0
            for i, row in enumerate(tokenized):
                table[i, : len(row)] = torch.arange(position, position + len(row))
                position += len(row)
            return Scoring("choices", len(prompts), pairs=self._pairs(prompt_rows, targets, device),
                           table=to_device(table, device))
        if self.kind == "masked":
            rows = [self._prompt_ids(p + self.separator + self.tokenizer.mask_token, self.max_length) for p in prompts]
            ids, attention = self._pad(rows, left=False)
            # The mask we appended is the last one in each row.
            position = ((ids == self.tokenizer.mask_token_id) * torch.arange(ids.shape[1])).argmax(1)
            return Scoring("masked", len(prompts), to_device(ids, device), to_device(attention, device),
                           columns=self._first_tokens(device), position=to_device(position, device), texts=prompts)
        n_cand, longest = len(self.candidate_ids), max(len(ids) for ids in self.candidate_ids)
        if longest == 1:  # one forward per prompt scores every single-token candidate at once
            ids, attention = self._pad([self._prompt_ids(p, self.max_length - 1) for p in prompts], left=True)
            return Scoring("next-token", len(prompts), to_device(ids, device), to_device(attention, device),
                           columns=self._first_tokens(device), texts=prompts)
        prompt_rows = [self._prompt_ids(p, self.max_length - longest) for p in prompts for _ in range(n_cand)]
        return Scoring("pairs", len(prompts), pairs=self._pairs(prompt_rows, self.candidate_ids * len(prompts), device))

    def prepare_answers(self, prompts: list[str], answers: list[str]) -> Pairs:
        self._need_causal("generation tasks")
        targets = [self._continuation(answer) + self._newline() for answer in answers]
        return self._pairs([self._prompt_ids(p, self.max_length - len(t)) for p, t in zip(prompts, targets)], targets,
                           self.device)

    def _pairs(self, prompt_rows: list[list[int]], targets: list[list[int]], device) -> Pairs:
        longest = max(map(len, targets))
        ids, attention = self._pad([prompt + target for prompt, target in zip(prompt_rows, targets)], left=True)
        lengths = torch.tensor([len(target) for target in targets])
        on_target = (torch.arange(longest).unsqueeze(0) >= (longest - lengths).unsqueeze(1)).float()
        return Pairs(to_device(ids, device), to_device(attention, device), to_device(on_target, device),
                     to_device(lengths.float(), device), longest)

    def right_table(self, right: list[list[int]], scoring: Scoring) -> torch.Tensor:
        width = scoring.table.shape[1] if scoring.table is not None else len(self.candidate_ids)
        is_right = torch.zeros(len(right), width, dtype=torch.bool)
        for row, columns in enumerate(right):
            is_right[row, columns] = True
        return to_device(is_right, self.device)

    def _first_tokens(self, device) -> torch.Tensor:
        if device not in self._columns:
            self._columns[device] = to_device(torch.tensor([ids[0] for ids in self.candidate_ids]), device)
        return self._columns[device]

    # -- computation on prepared inputs: device work only ---------------------------------

    def score(self, scoring: Scoring, copies: int = 1) -> torch.Tensor:
        """[copies * prompts, candidates] mean log-likelihoods of prepared inputs."""
        if scoring.mode in ("pairs", "choices"):
            flat = self._pair_logp(scoring.pairs, copies)
            if scoring.mode == "pairs":
                return flat.view(copies * scoring.prompts, -1)
            padded = torch.cat([flat.view(copies, -1), flat.new_full((copies, 1), float("-inf"))], 1)
            return padded[:, scoring.table].view(copies * scoring.prompts, -1)
        if self.features is not None and copies == 1 and self.features.covers(scoring.texts) \
                and self.head.trunk_frozen(self.model):
            return self.features.scores(scoring.texts, scoring.columns)
        logits = self._logits(scoring, copies, self._one_position_inputs(scoring, copies))
        if scoring.mode == "next-token":
            logits = logits[:, -1].float()
        else:
            rows = torch.arange(logits.shape[0], device=logits.device)
            logits = logits[rows, scoring.position.repeat(copies)].float()
        return torch.log_softmax(logits, dim=-1)[:, scoring.columns]

    def record(self, scoring: Scoring) -> tuple | None:
        """The candidate head's record of one forward of ``scoring`` (next-token or masked): what the head read and
        the output layer's logits; None where :meth:`_logits` keeps no record (something besides the head trains,
        or the model changes its logits after the output layer)."""
        self._logits(scoring, 1, self._one_position_inputs(scoring, 1))
        return scoring.trunk or None

    def _one_position_inputs(self, scoring: Scoring, copies: int) -> dict:
        ids, attention = scoring.ids.repeat(copies, 1), scoring.attention.repeat(copies, 1)
        if scoring.mode == "next-token":
            return self._causal_inputs(ids, attention, keep=1)
        return dict(input_ids=ids, attention_mask=attention)

    def cross_entropy(self, scoring: Scoring, labels: torch.Tensor, copies: int | None = None) -> torch.Tensor:
        if copies is None:
            return F.cross_entropy(self.score(scoring), labels)
        each = F.cross_entropy(self.score(scoring, copies), labels.repeat(copies), reduction="none")
        return each.view(copies, scoring.prompts).mean(1)

    def minus_accuracy(self, scoring: Scoring, is_right: torch.Tensor, copies: int | None = None) -> torch.Tensor:
        predicted = self.score(scoring, copies or 1).argmax(1).view(copies or 1, scoring.prompts)
        hits = is_right.gather(1, predicted.T).T.float().mean(1)
        return -hits if copies is not None else -hits[0]

    def answer_nll(self, pairs: Pairs, prompts: int, copies: int | None = None) -> torch.Tensor:
        logp = -self._pair_logp(pairs, copies or 1)
        return logp.view(copies or 1, prompts).mean(1) if copies is not None else logp.mean()

    def _pair_logp(self, pairs: Pairs, copies: int) -> torch.Tensor:
        """[copies * rows] mean log-likelihood of each row's target tokens after its prompt."""
        ids, attention = pairs.ids.repeat(copies, 1), pairs.attention.repeat(copies, 1)
        keep = pairs.longest + 1
        logits = self._logits(pairs, copies, self._causal_inputs(ids, attention, keep))[:, -keep:].float()
        targets = ids[:, -pairs.longest:]
        logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        return (logp * pairs.on_target.repeat(copies, 1)).sum(1) / pairs.lengths.repeat(copies)

    def _logits(self, prepared: Scoring | Pairs, copies: int, inputs: dict) -> torch.Tensor:
        """The model's logits for ``inputs``, the forward of ``prepared`` (a minibatch). With a candidate head
        (--peft head) and nothing else of the model training, the first call records what the head reads and
        writes, and later calls for the same minibatch (a zeroth-order step's other points) correct that record
        rather than run the model again. A model that changes its logits after the output layer (soft-capping)
        fails the first call's check and runs every time."""
        if self.head is None or copies != 1 or prepared.trunk is False:
            return self.model(**inputs).logits
        if prepared.trunk is not None:
            return self.head(*prepared.trunk)
        if not self.head.trunk_frozen(self.model):
            return self.model(**inputs).logits
        with self.head.capturing() as record:
            logits = self.model(**inputs).logits
        prepared.trunk = record[0] if len(record) == 1 and torch.equal(self.head(*record[0]), logits) \
            else False
        return logits

    def _causal_inputs(self, input_ids, attention, keep: int) -> dict:
        kwargs = dict(input_ids=input_ids, attention_mask=attention)
        if self.use_cache:  # a scoring forward needs no key/value cache: building one costs memory and host work
            kwargs["use_cache"] = False
        if self.position_ids:  # left padding: count positions from each row's first real token
            kwargs["position_ids"] = (attention.cumsum(1) - 1).clamp(min=0)
        if self.logits_to_keep:
            kwargs["logits_to_keep"] = keep
        return kwargs

    # -- tokens ------------------------------------------------------------------------

    def _newline(self) -> list[int]:
        ids = self.tokenizer("\n", add_special_tokens=False)["input_ids"]
        return ids[-1:] if ids else []

    def _need_causal(self, what: str) -> None:
        if self.kind == "masked":
            raise UserError(f"{what} need a causal LM; this model is a masked LM")

    def _prompt_ids(self, prompt: str, room: int) -> list[int]:
        ids = self.tokenizer(prompt)["input_ids"]
        return ids[-room:]  # keep the end of a long prompt: the candidate must follow its last words

    def _pad(self, rows, left: bool):
        """Host tensors of the rows padded to one width."""
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            span = slice(width - len(row), width) if left else slice(0, len(row))
            ids[i, span] = torch.tensor(row)
            attention[i, span] = 1
        return ids, attention
