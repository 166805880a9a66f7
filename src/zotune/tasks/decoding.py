"""Batched decoding for rewards: a whole population of perturbed copies in one batch.

:func:`decode` runs its own loop over the KV cache (no ``model.generate``) so that every
forward is a plain call whose batch is the prompts repeated ``copies`` times, copy-major:
under a :class:`~zotune.core.perturb.StackedPerturbation` each copy's rows then carry their
own perturbation (low-rank directions as output deltas) at the prefill and at every new
token. Rows stop at a newline or the end-of-sequence token; the loop stops when all have.

Sampling (``temperature`` > 0) is Gumbel-max with noise drawn from a private generator for
one copy's rows and repeated over the copies: the members of a population see the same
random numbers, so their rewards differ by their weights alone (common random numbers).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from zotune.tasks.scoring import Scorer, _forward_accepts, to_device


@dataclass
class Prompts:
    """Left-padded prompt ids on the device."""

    ids: torch.Tensor
    attention: torch.Tensor


def chat_text(tokenizer, prompt: str) -> str:
    """``prompt`` as the user's turn of the tokenizer's chat template, ready for the answer (unchanged when the
    tokenizer has no template)."""
    if not getattr(tokenizer, "chat_template", None):
        return prompt
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)


def prepare(scorer: Scorer, prompts: list[str], chat: bool = False) -> Prompts:
    """Tokenized, left-padded and on the device: built before a step, so that its decodings copy nothing."""
    scorer._need_causal("generation tasks")
    texts = [chat_text(scorer.tokenizer, p) for p in prompts] if chat else list(prompts)
    room = scorer.max_length - scorer.max_new_tokens
    rows = [scorer.tokenizer(text, add_special_tokens=not chat)["input_ids"][-room:] for text in texts]
    ids, attention = scorer._pad(rows, left=True)
    return Prompts(to_device(ids, scorer.device), to_device(attention, scorer.device))


_STOPS: dict[tuple, torch.Tensor] = {}


def stop_tokens(tokenizer, vocabulary: int, model_eos=None) -> torch.Tensor:
    """[vocabulary] bool: the end-of-sequence tokens (the tokenizer's and ``model_eos``, the model's generation
    config's) and every token whose text holds a newline."""
    key = (id(tokenizer), vocabulary, tuple(_as_list(model_eos)))
    cached = _STOPS.get(key)
    if cached is None:
        stops = torch.zeros(vocabulary, dtype=torch.bool)
        pieces = tokenizer.convert_ids_to_tokens(list(range(min(vocabulary, len(tokenizer)))))
        for i, piece in enumerate(pieces):
            if piece is not None and ("\n" in piece or "Ċ" in piece):  # Ċ: byte-level BPE's newline
                stops[i] = True
        for eos in _as_list(tokenizer.eos_token_id) + _as_list(model_eos):
            if eos < vocabulary:
                stops[eos] = True
        cached = _STOPS[key] = stops
    return cached


def _as_list(value) -> list[int]:
    return [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]


@torch.no_grad()
def decode(scorer: Scorer, prompts: Prompts, copies: int = 1, temperature: float = 0.0,
           generator: torch.Generator | None = None, stop: bool = True, stats: dict | None = None) -> list[str]:
    """The completions of ``prompts`` repeated ``copies`` times (copy-major), up to a newline, at most
    ``scorer.max_new_tokens`` tokens each: greedy, or sampled at ``temperature`` with ``generator``.
    ``stop=False`` decodes all ``max_new_tokens`` (benchmarks: the same work for every setting). ``stats``: a dict
    whose ``"tokens"`` (tokens generated, up to each row's stop) this adds to."""
    model, tokenizer = scorer.model, scorer.tokenizer
    ids, attention = prompts.ids.repeat(copies, 1), prompts.attention.repeat(copies, 1)
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    extra = {"use_cache": True}
    if scorer.logits_to_keep:
        extra["logits_to_keep"] = 1
    cache_name = "cache" if _forward_accepts(model, "cache") else "past_key_values"  # transformers 5.x: cache
    output = model(input_ids=ids, attention_mask=attention, position_ids=positions, **extra)
    rows, device = ids.shape[0], ids.device
    stops, pad = None, scorer.pad_id
    done = torch.zeros(rows, dtype=torch.bool, device=device)
    generated = []
    last = positions[:, -1]
    for _ in range(scorer.max_new_tokens):
        logits = output.logits[:, -1].float()
        if stops is None:
            generation = getattr(model, "generation_config", None)
            stops = to_device(stop_tokens(tokenizer, logits.shape[-1], getattr(generation, "eos_token_id", None)),
                              device)
        if temperature > 0:
            uniform = torch.rand((rows // copies, logits.shape[-1]), generator=generator).clamp_(min=1e-20)
            gumbel = to_device(-torch.log(-torch.log(uniform)), device).repeat(copies, 1)
            token = (logits / temperature + gumbel).argmax(-1)
        else:
            token = logits.argmax(-1)
        token = torch.where(done, torch.full_like(token, pad), token)
        generated.append(token)
        if stop:
            done |= stops[token]
        if stop and bool(done.all()):  # one host synchronisation a token: the loop's exit test
            break
        attention = torch.cat([attention, torch.ones_like(attention[:, :1])], dim=1)
        last = last + 1
        cache = getattr(output, "cache", None) or getattr(output, "past_key_values", None)
        output = model(input_ids=token[:, None], attention_mask=attention, position_ids=last[:, None],
                       **{cache_name: cache}, **extra)
    tokens = torch.stack(generated, dim=1).tolist()
    texts, stop_list = [], stops.tolist()
    for row in tokens:
        cut = next((i for i, t in enumerate(row) if t < len(stop_list) and stop_list[t]), None)
        texts.append(tokenizer.decode(row[:cut], skip_special_tokens=True).strip())
        if stats is not None:
            stats["tokens"] = stats.get("tokens", 0) + (len(row) if cut is None else cut + 1)
    return texts
