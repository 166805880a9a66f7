"""A trainable correction of a model's output layer on the few tokens a classification task scores.

A task that chooses between candidate words (``great`` / ``terrible``) reads only their rows of the output layer.
:class:`CandidateHead` wraps that layer and adds, on those tokens alone, ``hidden · Δᵀ + b``: Δ holds one row per
token (as wide as the hidden state) and b one bias, both starting at zero, so the wrapped model starts as the
model. Training Δ and b alone is a linear probe of the frozen model's last hidden state, written so that the
model's own candidate scoring (and its mean log-likelihoods) stays the objective; on rt-sst2 a probe of the default
model reaches 83–85 % where zero-shot is 47 % (BENCHMARKS.md).

Δ reads the hidden state divided, feature by feature, by its RMS (``scale``): a few features of a trained model
are a hundred times larger than the rest, and an isotropic random direction would move the logits almost only
along them. When the head is made, the RMS is measured on the model reading random vocabulary tokens from a fixed
seed (no data); a training run then measures it again with :meth:`CandidateHead.measure` on hidden states of its
own prompts. The two differ most in middle blocks, where random tokens light up features that prompts leave
small, and by random tokens' measure zeroth order there learns several times slower (BENCHMARKS.md).

Why it suits zeroth order: the trained tensor has a thousand elements, not a hundred million, so a random
direction finds the gradient a thousand times more readily; and every evaluation of a step shares the frozen
trunk. :meth:`capturing` records what the layer reads and writes during one forward, and the head called on that
record gives the logits of any Δ and b, so a step pays one forward of its batch however many points it evaluates
(``Scorer`` keeps the record of a minibatch while nothing outside the head trains).

The layer stays in the model under its own name (``…lm_head.output``), so tied input embeddings stay tied and
untouched: the candidate words read as before when they occur in a prompt.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from zotune.core.quant import replace_module
from zotune.core.rng import hash64


class CandidateHead(nn.Module):
    def __init__(self, output: nn.Module, token_ids: list[int], hidden_size: int, dtype: torch.dtype,
                 device: torch.device, source: nn.Module | None = None):
        super().__init__()
        self.output = output
        # With a source (a block of the model), Δ reads that block's output at the positions the output layer
        # reads, instead of the output layer's input: a probe of a middle layer. A hook, not a submodule: the block
        # belongs to the model.
        self._source_output: torch.Tensor | None = None
        self._source_hook = None if source is None else source.register_forward_hook(self._keep_source)
        self.register_buffer("token_ids", torch.tensor(sorted(set(token_ids)), device=device), persistent=False)
        self.delta = nn.Parameter(torch.zeros(len(self.token_ids), hidden_size, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(len(self.token_ids), dtype=dtype, device=device))
        self.register_buffer("scale", torch.ones(hidden_size, dtype=dtype, device=device), persistent=False)
        self._record: list | None = None

    def forward(self, hidden: torch.Tensor, logits: torch.Tensor | None = None, compact: bool = False) -> torch.Tensor:
        """The corrected logits of ``hidden``; with ``logits`` (the wrapped layer's for ``hidden``, recorded by
        :meth:`capturing`), without running that layer again; with ``compact``, ``logits`` hold the head's tokens
        alone (in ``token_ids``' order) and so does the result. Called as a module in every case, so that a
        zeroth-order perturbation of Δ and b, substituted while their module runs, is seen."""
        if compact:
            return logits + self.correction(hidden).to(logits.dtype)
        if logits is None:
            logits = self.output(hidden)
            if self._source_hook is not None:
                hidden, self._source_output = self._source_output[..., -hidden.shape[-2]:, :], None
            if self._record is not None:
                self._record.append((hidden.detach(), logits.detach()))
        return self.adjust(hidden, logits)

    def _keep_source(self, module, args, output):
        self._source_output = _block_output(output)

    def adjust(self, hidden: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """``logits``, the wrapped layer's for ``hidden``, with this head's correction."""
        return logits.index_add(-1, self.token_ids, self.correction(hidden).to(logits.dtype))

    def correction(self, hidden: torch.Tensor) -> torch.Tensor:
        """Δ · (hidden / scale) + b: what the head adds to each of its tokens' logits."""
        return F.linear(hidden.to(self.delta.dtype) / self.scale, self.delta, self.bias)

    @contextmanager
    def capturing(self):
        """Records the (hidden, logits) pairs of the wrapped layer's calls inside the block."""
        self._record = []
        try:
            yield self._record
        finally:
            self._record = None

    @torch.no_grad()
    def measure(self, hidden: torch.Tensor) -> None:
        """Sets the feature scale to the RMS of ``hidden`` ([N, features]: what the head reads, one row per
        position it scores)."""
        self.scale.copy_(feature_rms(hidden))

    def own_parameters(self) -> list[nn.Parameter]:
        """Δ and b (not the wrapped layer's weights)."""
        return [self.delta, self.bias]

    def trunk_frozen(self, model: nn.Module) -> bool:
        """Whether nothing of ``model`` but Δ and b trains: then one forward's record serves every evaluation of a
        step."""
        mine = {id(p) for p in self.own_parameters()}
        return not any(p.requires_grad for p in model.parameters() if id(p) not in mine)


SCALE_TOKENS = (8, 32)  # random sequences x tokens whose hidden states measure the features' RMS


def add_head(model: nn.Module, token_ids: list[int], source: nn.Module | None = None) -> CandidateHead:
    """Wraps ``model``'s output layer in place with a zero :class:`CandidateHead` on ``token_ids`` (reading the
    output of the block ``source`` if given) and measures its feature scale; returns it."""
    output = model.get_output_embeddings()
    hidden_size = getattr(output, "in_features", None)
    if hidden_size is None:
        raise ValueError(f"{type(model).__name__} has no linear output layer to correct")
    name = next(name for name, module in model.named_modules() if module is output)
    quantized = getattr(output, "quantized", None)  # zotune's quantized layer computes in its compute_dtype
    if quantized is not None:
        dtype, device = quantized.compute_dtype, quantized.codes.device
    else:
        dtype, device = output.weight.dtype, output.weight.device
    rms = _feature_rms(model, source, output)
    if rms.shape[0] != hidden_size:
        raise ValueError(f"the block's hidden state is {rms.shape[0]} wide, the output layer reads {hidden_size}: "
                         "read the last layer")
    head = CandidateHead(output, token_ids, hidden_size, dtype, device, source)
    head.scale.copy_(rms)
    replace_module(model, name, head)
    return head


@torch.no_grad()
def _feature_rms(model: nn.Module, source: nn.Module | None, output: nn.Module) -> torch.Tensor:
    """The RMS of each feature the head will read (``source``'s output, or ``output``'s input) while the model reads
    random vocabulary tokens drawn from a fixed seed."""
    seen = []
    if source is None:
        hook = output.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    else:
        hook = source.register_forward_hook(lambda module, args, out: seen.append(_block_output(out)))
    vocabulary = model.get_input_embeddings().num_embeddings
    generator = torch.Generator().manual_seed(hash64("zotune-head-scale") >> 1)
    tokens = torch.randint(0, vocabulary, SCALE_TOKENS, generator=generator)
    was_training = model.training
    model.eval()
    try:
        model(input_ids=tokens.to(next(model.parameters()).device))
    finally:
        hook.remove()
        model.train(was_training)
    return feature_rms(torch.cat([h.reshape(-1, h.shape[-1]) for h in seen]))


def feature_rms(hidden: torch.Tensor) -> torch.Tensor:
    rms = hidden.float().pow(2).mean(0).sqrt()
    return rms.clamp_min(rms.mean() * 1e-3)  # a feature that never moves would divide by zero


def _block_output(output):
    """A block's hidden state (transformers blocks return it alone or first in a tuple)."""
    return output[0] if isinstance(output, tuple) else output


def find_head(model: nn.Module) -> CandidateHead | None:
    return next((module for module in model.modules() if isinstance(module, CandidateHead)), None)


def remove_head(model: nn.Module) -> None:
    """Puts ``model``'s output layer back in place of its candidate head."""
    name, head = next((name, m) for name, m in model.named_modules() if isinstance(m, CandidateHead))
    if head._source_hook is not None:
        head._source_hook.remove()
    replace_module(model, name, head.output)
