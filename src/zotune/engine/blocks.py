"""Where a Hugging Face model's transformer blocks are, and what runs before and after them.

HZO runs zeroth order on the shallow blocks and first order on the deepest ones, and
block-wise offload moves one block at a time to the GPU: both need the model cut into
embeddings, blocks in forward order and head, named as ``model.named_parameters()``
names them (with peft's ``base_model.model.`` prefix for a peft model).

The blocks of a known family are found from ``config.model_type`` in :data:`FAMILIES`;
any other model needs the dotted path of its ``nn.ModuleList`` of blocks (``--blocks``).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from zotune.errors import UserError


@dataclass(frozen=True)
class Family:
    """Where a family's modules are, as dotted paths inside its backbone (the ``*Model`` class, e.g. ``LlamaModel``).

    An optional module that the config leaves out (``None``, e.g. OPT's ``project_in``) is skipped.
    The task head of a ``*ForCausalLM`` / ``*ForMaskedLM`` / ``*ForSequenceClassification``
    (``lm_head``, ``cls``, ``score``, ...) is not listed: whatever such a model holds beside its
    backbone reads the backbone's output, so it is head.
    """

    blocks: str
    embeddings: tuple[str, ...]
    head: tuple[str, ...]


# The rotary embedding owns no parameters but runs before the blocks, and offload must move its buffers.
_ROPE_DECODER = Family("layers", ("embed_tokens", "rotary_emb"), ("norm",))
_ENCODER = Family("encoder.layer", ("embeddings",), ("pooler",))

FAMILIES: dict[str, Family] = {
    "llama": _ROPE_DECODER,
    "mistral": _ROPE_DECODER,
    "qwen2": _ROPE_DECODER,
    "qwen3": _ROPE_DECODER,
    "phi3": _ROPE_DECODER,
    "gemma": _ROPE_DECODER,
    "gemma2": _ROPE_DECODER,
    "gemma3_text": _ROPE_DECODER,
    "phi": Family("layers", ("embed_tokens", "rotary_emb"), ("final_layernorm",)),
    "opt": Family("decoder.layers", ("decoder.embed_tokens", "decoder.embed_positions", "decoder.project_in"),
                  ("decoder.final_layer_norm", "decoder.project_out")),
    "gpt2": Family("h", ("wte", "wpe"), ("ln_f",)),
    "gpt_neox": Family("layers", ("embed_in", "rotary_emb"), ("final_layer_norm",)),
    "falcon": Family("h", ("word_embeddings", "rotary_emb"), ("ln_f",)),
    "bert": _ENCODER,
    "roberta": _ENCODER,
}


@dataclass
class BlockLayout:
    """A model cut into the modules that run before its blocks, the blocks in forward order, and the modules after them.

    Names are qualified in the model given to :func:`find_blocks`; ``blocks_path`` is relative to
    the model inside a peft wrapper, as ``--blocks`` takes it.
    """

    blocks: list[tuple[str, nn.Module]]
    embeddings: list[tuple[str, nn.Module]]
    head: list[tuple[str, nn.Module]]
    blocks_path: str

    def section_of(self, model: nn.Module) -> dict[str, str]:
        """``model.named_parameters()`` name -> ``"embeddings"``, ``"block:<i>"``, ``"head"`` or ``"other"``.

        A parameter in several sections is reported under the deepest one: a head tied to the
        input embedding under ``"head"``. Such parameters are listed by :meth:`shared`.
        """
        owners = self._owners()
        return {name: owners.get(id(param), ["other"])[-1] for name, param in model.named_parameters()}

    def shared(self, model: nn.Module) -> set[str]:
        """Names of the parameters that belong to more than one section (tied weights)."""
        owners = self._owners()
        return {name for name, param in model.named_parameters() if len(owners.get(id(param), ())) > 1}

    def _owners(self) -> dict[int, list[str]]:
        """Parameter id -> the sections holding it, in forward order."""
        sections = [("embeddings", module) for _, module in self.embeddings]
        sections += [(f"block:{i}", module) for i, (_, module) in enumerate(self.blocks)]
        sections += [("head", module) for _, module in self.head]
        owners: dict[int, list[str]] = {}
        for section, module in sections:
            for param in module.parameters():
                held = owners.setdefault(id(param), [])
                if section not in held:
                    held.append(section)
        return owners


def find_blocks(model: nn.Module, blocks: str = "auto") -> BlockLayout:
    """The :class:`BlockLayout` of ``model`` (a transformers model, or a peft model around one).

    ``blocks``: ``"auto"`` looks the family up in :data:`FAMILIES`; a dotted path (relative to
    the model inside a peft wrapper, e.g. ``"model.layers"``) names the ``nn.ModuleList`` of
    blocks of any model, and then every other module owning parameters is embeddings or head
    by whether it is registered before or after the blocks.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if blocks == "auto":
        embeddings, layer_list, head = _from_table(base)
    else:
        layer_list = _module_list(base, blocks)
        embeddings, head = _around(base, layer_list)
    names = {id(module): name for name, module in model.named_modules()}
    base_names = {id(module): name for name, module in base.named_modules()}
    return BlockLayout(
        blocks=[(f"{names[id(layer_list)]}.{i}", block) for i, block in enumerate(layer_list)],
        embeddings=[(names[id(module)], module) for module in embeddings],
        head=[(names[id(module)], module) for module in head],
        blocks_path=base_names[id(layer_list)],
    )


def _from_table(base: nn.Module) -> tuple[list[nn.Module], nn.ModuleList, list[nn.Module]]:
    model_type = getattr(getattr(base, "config", None), "model_type", None)
    family = FAMILIES.get(model_type)
    if family is None:
        raise UserError(f"zotune does not know where the transformer blocks of {type(base).__name__} ({model_type}) "
                        "are: pass --blocks with the dotted path of its nn.ModuleList of blocks, e.g. --blocks model.layers")
    backbone = getattr(base, "base_model", base)  # transformers: the *Model inside a task model, or itself
    found = {path: _optional(backbone, path, base, model_type) for path in (family.blocks, *family.embeddings, *family.head)}
    layer_list = found[family.blocks]
    if not isinstance(layer_list, nn.ModuleList):
        raise UserError(f"{type(base).__name__} ({model_type}) has no nn.ModuleList of blocks at {family.blocks}: "
                        "pass --blocks with the dotted path of its blocks")
    embeddings = [found[path] for path in family.embeddings if found[path] is not None]
    head = [found[path] for path in family.head if found[path] is not None]
    if backbone is not base:
        head += [module for module in base.children() if module is not backbone and _has_parameters(module)]
    return embeddings, layer_list, head


def _optional(root: nn.Module, path: str, base: nn.Module, model_type: str) -> nn.Module | None:
    """The module at ``path`` under ``root``; ``None`` where the config left it out."""
    module = root
    for part in path.split("."):
        if not hasattr(module, part):
            raise UserError(f"{type(base).__name__} ({model_type}) has no {path} where zotune expects it "
                            "(another transformers version?): pass --blocks with the dotted path of its blocks")
        module = getattr(module, part)
        if module is None:
            return None
    return module


def _module_list(base: nn.Module, path: str) -> nn.ModuleList:
    try:
        module = base.get_submodule(path)
    except AttributeError:
        raise UserError(f"--blocks {path}: {type(base).__name__} has no submodule {path}") from None
    if not isinstance(module, nn.ModuleList):
        raise UserError(f"--blocks {path} is a {type(module).__name__}, not the nn.ModuleList of the blocks")
    return module


def _around(base: nn.Module, layer_list: nn.ModuleList) -> tuple[list[nn.Module], list[nn.Module]]:
    """The modules owning parameters outside the blocks, split by registration order around the block list.

    Registration order is forward order in most models, which is all a model outside the table
    lets us assume.
    """
    inside = {id(module) for module in layer_list.modules()}
    embeddings: list[nn.Module] = []
    head: list[nn.Module] = []
    after = False
    for module in base.modules():
        if module is layer_list:
            after = True
        elif id(module) not in inside and next(module.parameters(recurse=False), None) is not None:
            (head if after else embeddings).append(module)
    return embeddings, head


def _has_parameters(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None
