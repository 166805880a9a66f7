"""Exact perturbation: the loss sees W + eps*z, the stored weights are never rounded.

Writing the perturbation into the weights (W += eps*z ... W -= eps*z) cannot restore
them exactly in bfloat16/float16, which is why the reference MeZO code drifts. While a
:class:`Perturbation` is active, every perturbed parameter is seen perturbed by the
loss in one of three ways, and handed back bit-identical afterwards:

* **substitution** (the usual case): a global forward pre-hook swaps the parameter's
  storage for a scratch tensor holding W + eps*z just before a module that owns it
  runs, and swaps it back right after. Extra memory: the parameters of the modules
  running at that moment (for leaf-owned weights, one tensor).
* **output delta**: for low-rank directions on Linear / Conv1D / Embedding, a forward
  hook adds eps * (x V) U^T to the output; nothing the size of W is built.
* **whole-context substitution**, for parameters the loss reads outside the forward of
  a module that owns them (a bare parameter in a loss function, a tied weight used
  functionally by another module): their storage is swapped for W + eps*z for the
  whole evaluation. Extra memory: one copy of each such parameter.

Which parameters are read outside their owners is found by a *probe*: one evaluation
under a ``TorchFunctionMode`` that watches every torch call for a perturbed parameter
seen while no owner of it is running.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves, tree_map

from zotune.core.directions import Direction, Draw, LowRank


@dataclass(frozen=True)
class PerturbedParam:
    """A parameter to perturb, with its direction key and direction."""

    param: torch.Tensor
    key: str
    direction: Direction


class Perturbation:
    """Context manager under which the loss sees ``W + eps * z`` for the given parameters.

    ``whole``: ids of the parameters to substitute for the whole context (read outside
    their owners). ``probe``: watch for such reads; after the context, :attr:`read_outside`
    holds the ids found (the loss computed under a probe that found some is wrong for them).
    """

    def __init__(self, params: list[PerturbedParam], draw: Draw, eps: float, whole=(), probe: bool = False,
                 scratch: dict | None = None):
        self.draw, self.eps, self.probe = draw, eps, probe
        # Scratch tensors kept between evaluations (one per shape and dtype): fresh CPU allocations
        # of this size cost page faults on every forward. None (on a GPU): none kept, not even within the
        # forward, where a spare per weight shape would add up to several weights beyond the one being perturbed.
        self._scratch = scratch
        self._by_id = {id(item.param): item for item in params}
        self._whole = {pid for pid in whole if pid in self._by_id}
        self._swapped: dict[int, tuple[torch.Tensor, int]] = {}
        self._deltas: dict[int, list[PerturbedParam]] = {}  # module id -> params perturbed via its output
        self._inside: dict[int, int] = {}  # param id -> owners running now
        self.used: set[int] = set()
        self.substituted: set[int] = set()  # perturbed by substitution at least once (no output delta)
        self.read_outside: set[int] = set()
        self._handles, self._mode, self._busy = [], None, False
        self._dropout_warned = False

    def __enter__(self) -> Perturbation:
        for pid in self._whole:
            self._swap_in(pid)
            self.used.add(pid)
        self._handles = [register_module_forward_pre_hook(self._before_forward),
                         register_module_forward_hook(self._after_forward, always_call=True)]
        if self.probe:
            self._mode = _ReadProbe(self)
            self._mode.__enter__()
        return self

    def __exit__(self, *exc_info) -> None:
        if self._mode is not None:
            self._mode.__exit__(*exc_info)
            self._mode = None
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for pid in list(self._swapped):  # also after a forward that raised
            self._restore(pid, force=True)
        self._deltas.clear()
        self._inside.clear()

    def _swap_in(self, pid: int) -> None:
        item = self._by_id[pid]
        original = item.param.data
        spare = None if self._scratch is None else self._scratch.pop((original.shape, original.dtype, original.device),
                                                                      None)
        item.param.data = item.direction.perturbed(original, item.key, self.draw, self.eps, spare)
        self._swapped[pid] = (original, 1)

    def _owned(self, module: nn.Module):
        for param in module._parameters.values():
            if param is not None and id(param) in self._by_id and id(param) not in self._whole:
                yield self._by_id[id(param)]

    def _before_forward(self, module: nn.Module, args):
        self._busy = True  # the hooks' own reads of the weights are not the loss's
        try:
            self._enter_module(module)
        finally:
            self._busy = False

    def _after_forward(self, module: nn.Module, args, output):
        self._busy = True
        try:
            return self._leave_module(module, args, output)
        finally:
            self._busy = False

    def _enter_module(self, module: nn.Module):
        if module.training and isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0:
            if not self._dropout_warned:
                self._dropout_warned = True
                warnings.warn("dropout is active during a zeroth-order forward, so the perturbed losses use "
                              "different masks; call model.eval() first", stacklevel=2)
        for item in self._owned(module):
            pid = id(item.param)
            self._inside[pid] = self._inside.get(pid, 0) + 1
            self.used.add(pid)
            if item.direction.output_delta_applies(module, item.param):
                self._deltas.setdefault(id(module), []).append(item)
            else:
                self._substitute(module, item)

    def _substitute(self, module: nn.Module, item: PerturbedParam) -> None:
        pid = id(item.param)
        self.substituted.add(pid)
        if pid in self._swapped:  # re-entered (a module calling itself): already perturbed
            original, depth = self._swapped[pid]
            self._swapped[pid] = (original, depth + 1)
        else:
            self._swap_in(pid)

    def _leave_module(self, module: nn.Module, args, output):
        for item in self._owned(module):
            pid = id(item.param)
            self._inside[pid] -= 1
            self._restore(pid)
        items = self._deltas.pop(id(module), None)
        if not items:
            return None
        for item in items:
            output = item.direction.perturb_output(module, item.param, args, output, item.key, self.draw, self.eps)
        return output

    def _restore(self, pid: int, force: bool = False):
        if pid not in self._swapped:
            return
        original, depth = self._swapped[pid]
        if depth > 1 and not force:
            self._swapped[pid] = (original, depth - 1)
            return
        scratch = self._by_id[pid].param.data
        self._by_id[pid].param.data = original
        del self._swapped[pid]
        if self._scratch is not None and scratch.is_contiguous():
            self._scratch[(scratch.shape, scratch.dtype, scratch.device)] = scratch

    def _saw(self, tensor) -> None:
        pid = id(tensor)
        if pid in self._by_id and not self._busy and pid not in self._whole and not self._inside.get(pid):
            self.read_outside.add(pid)


class StackedPerturbation(Perturbation):
    """Several perturbations in one forward (stacked evaluation).

    The batch is repeated once per copy along dim 0, copy-major; copy k sees
    ``W + eps_k z_k``. Output deltas are applied per copy. A module owning parameters
    without an output delta (norms, dense directions) is run on each copy's rows with that
    copy's weights substituted, the stacked call itself taking the first copy: no row is
    computed twice. Parameters read outside their owners cannot be stacked.
    """

    def __init__(self, params: list[PerturbedParam], copies: list[tuple[Draw, float]]):
        super().__init__(params, copies[0][0], copies[0][1])
        self.copies = copies
        self._factors: dict = {}  # low-rank directions' stacked U of each key, while the context lasts
        self._rerun: dict[int, list[PerturbedParam]] = {}
        self._total: int | None = None  # the repeated batch, learnt from the first batch-major output
        self._rerunning = False
        # module id -> (its stacked arguments, its weights) while its stacked call computes the first copy
        self._held: dict[int, tuple[tuple, list[torch.Tensor]]] = {}

    def _before_forward(self, module: nn.Module, args):
        if self._rerunning:  # a rerun is a plain call: other hooks (factored updates) see it, not this one
            return None
        super()._before_forward(module, args)
        rows = args[0].shape[0] if len(args) == 1 and isinstance(args[0], torch.Tensor) and args[0].ndim else 0
        # A global pre-hook cannot see keyword arguments, so only a module whose forward takes one input (Linear,
        # Embedding, norms) is cut to the first copy's rows; a batch broadcast to every copy (1 row) is not cut.
        if id(module) not in self._rerun or rows < 2 or rows % len(self.copies) or not _one_input(type(module)):
            return None
        draw, eps = self.copies[0]
        self._held[id(module)] = (args, _swap_in_copy(self._rerun[id(module)], draw, eps))
        return _copy_slice(args, 0, rows // len(self.copies), rows)

    def __enter__(self) -> StackedPerturbation:
        self._handles = [register_module_forward_pre_hook(self._before_forward),
                         register_module_forward_hook(self._after_stacked, with_kwargs=True, always_call=True)]
        return self

    def __exit__(self, *exc_info) -> None:
        for module_id, (_, originals) in self._held.items():  # a forward that failed before its hook ran
            _swap_back(self._rerun.get(module_id, []), originals)
        self._held.clear()
        super().__exit__(*exc_info)

    def _substitute(self, module: nn.Module, item: PerturbedParam) -> None:
        if next(module.children(), None) is not None:
            raise ValueError(f"stacked evaluation cannot perturb {item.key}: its module {type(module).__name__} has "
                             "submodules; evaluate perturbations separately (stacked=False)")
        self.substituted.add(id(item.param))
        self._rerun.setdefault(id(module), []).append(item)

    def _after_stacked(self, module: nn.Module, args, kwargs, output):
        if self._rerunning:
            return None
        self._busy = True
        try:
            return self._leave_stacked(module, args, kwargs, output)
        finally:
            self._busy = False

    def _leave_stacked(self, module, args, kwargs, output):
        for item in self._owned(module):
            self._inside[id(item.param)] -= 1
        rerun, deltas = self._rerun.pop(id(module), []), self._deltas.pop(id(module), [])
        held = self._held.pop(id(module), None)
        if held is not None:
            _swap_back(rerun, held[1])
        if not rerun and not deltas:
            return None
        copies = len(self.copies)
        shared = isinstance(output, torch.Tensor) and output.ndim > 0 and output.shape[0] == 1 and copies > 1
        total = output.shape[0] if isinstance(output, torch.Tensor) and output.ndim > 0 else 0
        if held is not None:  # it computed the first copy's rows: the others run below
            args, shared, total = held[0], False, held[0][0].shape[0]
            size, self._total = total // copies, self._total or total
        elif shared and self._total is not None:  # broadcast over the batch (GPT-2's positions): one row per copy
            size = 1
        elif isinstance(output, torch.Tensor) and output.ndim > 0 and total % copies == 0:
            size = total // copies
            self._total = self._total or total
        else:
            raise ValueError(f"stacked evaluation: {type(module).__name__} must return a tensor whose first "
                             f"dimension is the batch repeated {copies} times")
        if not rerun and not shared and all(isinstance(item.direction, LowRank) for item in deltas) and \
                len({draw.step for draw, _ in self.copies}) == 1:  # one batched GEMM per layer for all copies
            for item in deltas:
                output = item.direction.perturb_outputs(module, item.param, args, output, item.key, self.copies,
                                                        self._factors)
            return output
        pieces = []
        for k, (draw, eps) in enumerate(self.copies):
            part_args, part_kwargs = (args, kwargs) if shared else _copy_slice((args, kwargs), k, size, total)
            computed = held is not None and k == 0  # by the stacked call
            piece = output if computed else output.clone() if shared else output[k * size : (k + 1) * size]
            if rerun and not computed:
                originals = _swap_in_copy(rerun, draw, eps)
                try:
                    self._rerunning = True
                    piece = module(*part_args, **part_kwargs)
                finally:
                    self._rerunning = False
                    _swap_back(rerun, originals)
            for item in deltas:
                piece = item.direction.perturb_output(module, item.param, part_args, piece, item.key, draw, eps)
            pieces.append(piece.expand(self._total // copies, *piece.shape[1:]) if shared else piece)
        return torch.cat(pieces)


@functools.cache
def _one_input(kind: type) -> bool:
    try:
        inputs = list(inspect.signature(kind.forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return False
    return len(inputs) == 1 and inputs[0].kind in (inspect.Parameter.POSITIONAL_ONLY,
                                                   inspect.Parameter.POSITIONAL_OR_KEYWORD)


def _swap_in_copy(items: list[PerturbedParam], draw: Draw, eps: float) -> list[torch.Tensor]:
    """Gives each parameter the weights of one copy; returns the originals, for :func:`_swap_back`."""
    originals = []
    try:
        for item in items:
            originals.append(item.param.data)
            item.param.data = item.direction.perturbed(item.param.data, item.key, draw, eps)
    except BaseException:
        _swap_back(items, originals)
        raise
    return originals


def _swap_back(items: list[PerturbedParam], originals: list[torch.Tensor]) -> None:
    for item, original in zip(items, originals):
        item.param.data = original


def _copy_slice(tree, k: int, size: int, total: int):
    def cut(leaf):
        if isinstance(leaf, torch.Tensor) and leaf.ndim and leaf.shape[0] == total:
            return leaf[k * size : (k + 1) * size]
        return leaf

    return tree_map(cut, tree)


class _ReadProbe(TorchFunctionMode):
    """Notes every perturbed parameter passed to a torch function outside its owners' forwards."""

    def __init__(self, perturbation: Perturbation):
        super().__init__()
        self.perturbation = perturbation

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _name(func) not in _METADATA:
            for leaf in tree_leaves((args, kwargs)):
                if isinstance(leaf, torch.Tensor):
                    self.perturbation._saw(leaf)
        return func(*args, **kwargs)


# Reads of a tensor's metadata, not of its values (``model.dtype`` looks at a parameter).
_METADATA = {"dtype", "device", "shape", "ndim", "requires_grad", "is_cuda", "is_leaf", "layout", "grad", "data",
             "size", "dim", "numel", "nelement", "stride", "is_contiguous", "data_ptr", "element_size",
             "is_floating_point", "is_complex", "get_device", "storage_offset", "untyped_storage", "__len__",
             "__hash__", "requires_grad_", "__setstate__", "__reduce_ex__", "__deepcopy__"}


def _name(func) -> str:
    owner = getattr(func, "__self__", None)  # a property's getter or setter: name the property
    if type(owner).__name__ == "getset_descriptor":
        return owner.__name__
    return getattr(func, "__name__", "")
