"""Directions as objects: what a perturbation z looks like for one parameter.

A direction is a pure function of (base seed, step, sample seed, parameter key, index):
no hidden state, so any process can regenerate any slice of any past direction. Each
direction knows how to

* give a forward the perturbed weight ``W + eps * z`` (:meth:`Direction.perturbed`);
* perturb a layer's output instead, for low-rank directions on Linear, Hugging Face
  Conv1D and Embedding layers (:meth:`Direction.perturb_output`), so that the m×n
  perturbation is never materialised;
* apply the update ``W <- W - lr * (sum_j c_j z_j + weight_decay * W)``
  (:meth:`Direction.update_`), with stochastic rounding for bfloat16/float16.

A direction is recorded in trajectories by its :attr:`spec` (a small JSON dict).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from zotune.core import kernels
from zotune.core.rng import hash64


@dataclass(frozen=True)
class Draw:
    """Which direction of a step: the run's base seed, the step and one sample's seed."""

    base_seed: int
    step: int
    seed: int


def _flat(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().reshape(-1) if weight.is_contiguous() else weight.detach().contiguous().view(-1)


def local_part(param: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The elements of ``param`` this process holds and the flat index of the first: all of
    an ordinary tensor; a contiguous run of rows of one sharded by rows (FSDP2's DTensor)."""
    placements = getattr(param, "placements", None)
    if placements is None:
        return param, 0
    if len(placements) != 1 or not placements[0].is_shard(0):
        raise ValueError(f"zeroth order supports parameters sharded by rows (Shard(0)), not {placements}")
    local, rows = param.to_local(), param.shape[0]
    chunk = -(-rows // param.device_mesh.size())  # torch.chunk's split: equal rows, the last ranks shorter
    first = min(param.device_mesh.get_local_rank() * chunk, rows)
    if local.shape[0] != min(chunk, rows - first):
        raise ValueError(f"unexpected shard of {tuple(param.shape)}: {tuple(local.shape)} from row {first}")
    return local, first * (param.numel() // rows if rows else 0)


class Direction:
    """The protocol; see the module docstring. Subclasses set ``spec``."""

    spec: dict

    def perturbed(self, weight: torch.Tensor, key: str, draw: Draw, eps: float, out=None) -> torch.Tensor:
        """``W + eps * z`` in W's dtype, written into ``out`` (a tensor like W) when given."""
        raise NotImplementedError

    def output_delta_applies(self, module, weight) -> bool:
        """Whether :meth:`perturb_output` perturbs ``weight`` when ``module`` runs."""
        return False

    def perturb_output(self, module, weight, inputs, output, key: str, draw: Draw, eps: float) -> torch.Tensor:
        """The layer's output under ``W + eps * z``, computed from its output under W (in place)."""
        raise NotImplementedError

    def update_(self, weight, key: str, draws: list[Draw], coeffs: list[float], lr: float, weight_decay: float,
                rounding_seed: int | None) -> None:
        raise NotImplementedError

    def __eq__(self, other):
        return isinstance(other, Direction) and self.spec == other.spec

    def __hash__(self):
        return hash(tuple(sorted(self.spec.items())))

    def __repr__(self):
        options = ", ".join(f"{k}={v!r}" for k, v in self.spec.items() if k != "kind")
        return f"{type(self).__name__}({options})"


class Dense(Direction):
    """Element-wise z: ``"gaussian"`` (zotune 0.1's stream) or ``"rademacher"`` (every Philox bit a sign)."""

    def __init__(self, distribution: str = "gaussian"):
        if distribution not in kernels.DISTRIBUTIONS:
            raise ValueError(f"unknown distribution {distribution!r}: use gaussian or rademacher")
        self.distribution = distribution
        self.spec = {"kind": "dense", "distribution": distribution}

    def _kernels(self, device):
        # zotune 0.1's Rademacher stream lives in the reference backend only: old trajectories replay.
        return kernels.load("reference") if self.distribution == "rademacher-v1" else kernels.get(device)

    @staticmethod
    def key_hash(key: str) -> int:
        return _key_hash("param", key)

    def perturbed(self, weight, key, draw, eps, out=None):
        if out is None:
            out = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
        self._kernels(weight.device).perturb(out.view(-1), _flat(weight), 0, draw.seed, self.key_hash(key),
                                           self.distribution, eps)
        return out

    def update_(self, weight, key, draws, coeffs, lr, weight_decay, rounding_seed, start: int = 0):
        """``start``: the flat index of ``weight``'s first element in its parameter (a shard's offset)."""
        flat = _flat(weight)
        self._kernels(weight.device).update(flat, start, [d.seed for d in draws], list(coeffs), self.key_hash(key),
                                          self.distribution, lr, weight_decay, rounding_seed)
        if flat.data_ptr() != weight.data_ptr():
            weight.detach().copy_(flat.view_as(weight))


class Sparse(Direction):
    """Dense z on the smallest-magnitude ``fraction`` of each tensor's elements (Sparse-MeZO), 0 elsewhere.

    The mask comes from the weights themselves at the step (|w| at or below the tensor's
    ``fraction`` quantile, estimated from an evenly strided sample of at most 65,536 of its
    elements), so nothing is stored: the forwards and the update of one step see the same
    weights and so the same mask, and replay rebuilds it. Weight decay applies where z does.
    Extra memory: a bool mask, and during the update a copy of the tensor being updated.
    """

    SAMPLE = 65_536

    def __init__(self, distribution: str = "gaussian", fraction: float = 0.25):
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
        self._dense = Dense(distribution)
        self.fraction = float(fraction)
        self.spec = {"kind": "sparse", "distribution": distribution, "fraction": self.fraction}

    def mask(self, weight: torch.Tensor) -> torch.Tensor:
        magnitude = weight.detach().abs()
        flat = magnitude.reshape(-1)
        sample = flat[:: max(1, flat.numel() // self.SAMPLE)].float()
        threshold = sample.kthvalue(max(1, round(self.fraction * sample.numel()))).values
        return magnitude <= threshold.to(magnitude.dtype)

    def perturbed(self, weight, key, draw, eps, out=None):
        mask = self.mask(weight)
        values = self._dense.perturbed(weight, key, draw, eps, out)
        return torch.where(mask, values, weight.detach(), out=values)

    def update_(self, weight, key, draws, coeffs, lr, weight_decay, rounding_seed, start: int = 0):
        if start:
            raise ValueError(f"{key} is sharded: sparse directions need the whole tensor for their mask")
        mask, before = self.mask(weight), weight.detach().clone()
        self._dense.update_(weight, key, draws, coeffs, lr, weight_decay, rounding_seed)
        torch.where(mask, weight.detach(), before, out=weight.detach())


class LowRank(Direction):
    r"""Low-rank directions ``z = U V^T`` for matrices (LOZO; HZO's estimator, methods.md §3).

    For a 2-D weight of shape (m, n): ``U`` (m×r) is fresh for every sample and step,
    ``V`` (n×r) is shared by all samples and resampled every ``interval`` steps; both are
    Gaussian from counter-based streams. With ``orthonormal``, V is the Q factor of the
    Gaussian V times sqrt(n) (so V^T V = n I, the scale a Gaussian V has on average). The
    update is ``W <- W - lr * (sum_j c_j U_j V^T / rank + weight_decay * W)``. Tensors that
    are not 2-D use the dense Gaussian direction.

    On ``nn.Linear``, Hugging Face ``Conv1D`` and ``nn.Embedding`` the perturbation is
    added to the layer's output, ``eps * (x V) U^T`` (Linear), which costs ``r (m + n)``
    multiply-adds per token instead of a pass over W.
    """

    def __init__(self, rank: int = 2, interval: int = 50, orthonormal: bool = False):
        if not (isinstance(rank, int) and rank >= 1):
            raise ValueError(f"rank must be an integer >= 1, got {rank!r}")
        if not (isinstance(interval, int) and interval >= 1):
            raise ValueError(f"interval must be an integer >= 1, got {interval!r}")
        self.rank, self.interval, self.orthonormal = rank, interval, bool(orthonormal)
        self.spec = {"kind": "lowrank", "rank": rank, "interval": interval, "orthonormal": self.orthonormal}
        self._dense = Dense("gaussian")
        self._v_cache: dict = {}

    def factors(self, shape, key: str, draw: Draw, device) -> tuple[torch.Tensor, torch.Tensor]:
        """U (m×r) of this sample and V (n×r) of this step's resample interval, in float32."""
        m, n = shape
        backend = kernels.get(device)
        u = torch.empty(m * self.rank, device=device)
        backend.fill(u, 0, draw.seed, _key_hash("lowrank-U", key), "gaussian")
        return u.view(m, self.rank), self._v(n, key, draw.base_seed, draw.step // self.interval, device)

    def _v(self, n, key, base_seed, epoch, device):
        cache_key = (key, n, base_seed, str(device))
        cached = self._v_cache.get(cache_key)
        if cached is not None and cached[0] == epoch:
            return cached[1]
        v = torch.empty(n * self.rank, device=device)
        kernels.get(device).fill(v, 0, hash64("zotune-V", base_seed, epoch), _key_hash("lowrank-V", key), "gaussian")
        v = v.view(n, self.rank)
        if self.orthonormal:
            v = torch.linalg.qr(v).Q * math.sqrt(n)
        self._v_cache[cache_key] = (epoch, v)  # a pure function of its arguments: only saves recomputation
        return v

    def perturbed(self, weight, key, draw, eps, out=None):
        if weight.ndim != 2:
            return self._dense.perturbed(weight, key, draw, eps, out)
        u, v = self.factors(weight.shape, key, draw, weight.device)
        dtype = kernels.compute_dtype(weight.dtype)
        values = torch.addmm(weight.to(dtype), u.to(dtype), v.to(dtype).T, alpha=eps)
        return values.to(weight.dtype) if out is None else out.copy_(values)

    def output_delta_applies(self, module, weight) -> bool:
        return weight.ndim == 2 and _layer_kind(module) is not None and getattr(module, "weight", None) is weight

    def perturb_output(self, module, weight, inputs, output, key, draw, eps):
        u, v = self.factors(weight.shape, key, draw, weight.device)
        return _add_low_rank(module, inputs, output, u, v, eps)

    def perturb_outputs(self, module, weight, inputs, output, key, copies, cache: dict) -> torch.Tensor:
        """The layer's output for a batch repeated once per copy (copy-major), copy k under ``W + eps_k U_k V^T``:
        one batched GEMM for all copies. ``copies``: (draw, eps) pairs of one step (one V); ``cache`` keeps the
        stacked eps_k U_k of each key for the life of the population (a decoding's every token reuses them)."""
        n, dtype = len(copies), output.dtype
        entry = cache.get((key, dtype))
        if entry is None:  # eps_k U_k of every copy and V, made once (no host-to-device copy) per population
            first = copies[0][0]
            scaled = torch.stack([self.factors(weight.shape, key, draw, weight.device)[0].to(dtype) * eps
                                  for draw, eps in copies])
            v = self._v(weight.shape[1], key, first.base_seed, first.step // self.interval, weight.device).to(dtype)
            entry = cache[(key, dtype)] = (scaled, v)
        scaled, v = entry
        kind = _layer_kind(module)  # not cached with the factors: a tied weight is read by two kinds of layer
        if (output.requires_grad and torch.is_grad_enabled()) or not output.is_contiguous():
            output = output.clone(memory_format=torch.contiguous_format)
        rows = output.view(n, -1, output.shape[-1])
        if kind == "Embedding":  # y = W[ids]: each copy's U rows of its ids, times V^T
            ids = inputs[0].reshape(n, -1, 1).expand(-1, -1, self.rank)
            rows.baddbmm_(scaled.gather(1, ids), v.T.expand(n, -1, -1))
        else:
            x = inputs[0].reshape(n, -1, inputs[0].shape[-1]).to(dtype)
            if kind == "Linear":  # y = x W^T, W (out, in): (x V) U_k^T
                rows.baddbmm_(x @ v, scaled.transpose(1, 2))
            else:  # Conv1D: y = x W, W (in, out): (x U_k) V^T
                rows.baddbmm_(torch.bmm(x, scaled), v.T.expand(n, -1, -1))
        return output

    def update_(self, weight, key, draws, coeffs, lr, weight_decay, rounding_seed):
        if weight.ndim != 2:
            return self._dense.update_(weight, key, draws, coeffs, lr, weight_decay, rounding_seed)
        combined = self.combine(weight.shape, key, draws, coeffs, weight.device)
        self._apply(weight, key, combined, self.factors(weight.shape, key, draws[0], weight.device)[1], lr,
                    weight_decay, rounding_seed)

    # -- factored updates: between two draws of V, W_t = W - A_t V^T with A_t (m×r) kept aside --

    def combine(self, shape, key: str, draws: list[Draw], coeffs: list[float], device) -> torch.Tensor:
        """``sum_j c_j U_j / rank`` (m×r, float32): a step's update is ``lr`` times this times V^T."""
        combined = None
        for draw, coeff in zip(draws, coeffs):
            u, _ = self.factors(shape, key, draw, device)
            term = u * (coeff / self.rank)
            combined = term if combined is None else combined.add_(term)
        return combined

    def epoch(self, step: int) -> int:
        """Which draw of V a step uses."""
        return step // self.interval

    def merge_(self, weight, key: str, factor: torch.Tensor, base_seed: int, epoch: int,
               rounding_seed: int | None) -> None:
        """``W <- W - factor V^T`` with the V of ``epoch``: a factored update written into W."""
        v = self._v(weight.shape[1], key, base_seed, epoch, weight.device)
        self._apply(weight, key, factor, v, 1.0, 0.0, rounding_seed)

    def subtract_factor(self, module, weight, inputs, output, key: str, factor, base_seed: int, epoch: int):
        """The layer's output under ``W - factor V^T``, from its output under W."""
        v = self._v(weight.shape[1], key, base_seed, epoch, weight.device)
        return _add_low_rank(module, inputs, output, factor, v, -1.0)

    def _apply(self, weight, key, combined, v, lr, weight_decay, rounding_seed):
        m, n = weight.shape
        dtype = kernels.compute_dtype(weight.dtype)
        combined, v = combined.to(dtype), v.to(dtype)
        flat, backend = _flat(weight), kernels.get(weight.device)
        if weight.dtype == dtype:  # float32/float64: one GEMM pass in place, W (1 - lr wd) - lr C V^T
            flat.view(m, n).addmm_(combined, v.T, beta=1 - lr * weight_decay, alpha=-lr)
        else:  # bfloat16/float16: in float32 by pieces of rows, then (stochastically) rounded
            rows = max(1, kernels.CHUNK // max(n, 1))
            for begin in range(0, m, rows):
                end = min(begin + rows, m)
                w = flat[begin * n : end * n].view(end - begin, n).to(dtype, copy=True)
                step = combined[begin:end] @ v.T
                if weight_decay:
                    step.add_(w, alpha=weight_decay)
                w.add_(step, alpha=-lr)
                backend.round_into(flat[begin * n : end * n], w.view(-1), begin * n, Dense.key_hash(key),
                                   rounding_seed)
        if flat.data_ptr() != weight.data_ptr():
            weight.detach().copy_(flat.view_as(weight))


def _add_low_rank(module, inputs, output, p, q, alpha):
    """``output`` (in place) plus the change a weight change ``alpha * P Q^T`` (W is m×n, P m×r,
    Q n×r) makes to the layer's output: one rank-r GEMM, no m×n matrix."""
    kind = _layer_kind(module)
    p, q = p.to(output.dtype), q.to(output.dtype)
    if output.requires_grad and torch.is_grad_enabled():  # autograd may need the output as it was
        output = output.clone()
    rows = output.view(-1, output.shape[-1])
    if kind == "Embedding":  # y = W[ids]: P's rows of the looked-up ids times Q^T
        return rows.addmm_(p[inputs[0].reshape(-1)], q.T, alpha=alpha).view_as(output)
    x = inputs[0].reshape(-1, inputs[0].shape[-1]).to(output.dtype)
    if kind == "Linear":  # y = x W^T, W (out, in): (x Q) P^T
        return rows.addmm_(x @ q, p.T, alpha=alpha).view_as(output)
    return rows.addmm_(x @ p, q.T, alpha=alpha).view_as(output)  # Conv1D: y = x W, W (in, out)


def _layer_kind(module) -> str | None:
    # Only the stock forwards: a subclass may read W differently (OPT's positional embedding adds an offset).
    forward = type(module).forward
    if forward is torch.nn.Linear.forward:
        return "Linear"
    if forward is torch.nn.Embedding.forward and module.max_norm is None:  # max_norm rewrites W in place
        return "Embedding"
    return "Conv1D" if type(module).__name__ == "Conv1D" else None  # transformers' GPT-2 layer: y = x W + b


_KEY_HASHES: dict[tuple[str, str], int] = {}


def _key_hash(tag: str, key: str) -> int:
    cached = _KEY_HASHES.get((tag, key))
    if cached is None:
        cached = _KEY_HASHES[(tag, key)] = hash64(tag, key)
    return cached


def make(direction) -> Direction:
    """A Direction from an object, a spec dict, or a name (gaussian, rademacher, lowrank)."""
    if isinstance(direction, Direction):
        return direction
    if isinstance(direction, dict):
        spec = dict(direction)
        kind = spec.pop("kind", None)
        if kind == "dense":
            return Dense(**spec)
        if kind == "lowrank":
            return LowRank(**spec)
        if kind == "sparse":
            return Sparse(**spec)
        raise ValueError(f"unknown direction spec {direction!r}")
    if direction == "lowrank":
        return LowRank()
    if direction == "sparse":
        return Sparse()
    if isinstance(direction, str) and direction in kernels.DISTRIBUTIONS:
        return Dense(direction)
    raise ValueError(f"unknown direction {direction!r}: use gaussian, rademacher, lowrank, sparse or a zotune "
                     "Direction")
