import warnings

import pytest
import torch
import transformers as tf
from torch import nn

from zotune.engine.blocks import FAMILIES, find_blocks
from zotune.errors import UserError

VOCAB = 100
_DECODER = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=2,
                max_position_embeddings=64)

# name -> (model class, config class, config kwargs, layer count)
MODELS = {
    "llama": (tf.LlamaForCausalLM, tf.LlamaConfig, dict(_DECODER, tie_word_embeddings=True), 3),
    "llama-base": (tf.LlamaModel, tf.LlamaConfig, _DECODER, 2),
    "qwen2": (tf.Qwen2ForCausalLM, tf.Qwen2Config, _DECODER, 2),
    "qwen3": (tf.Qwen3ForCausalLM, tf.Qwen3Config, dict(_DECODER, head_dim=8), 2),
    "mistral": (tf.MistralForCausalLM, tf.MistralConfig, _DECODER, 3),
    "phi3": (tf.Phi3ForCausalLM, tf.Phi3Config, dict(_DECODER, pad_token_id=0), 2),
    "gemma": (tf.GemmaForCausalLM, tf.GemmaConfig, dict(_DECODER, head_dim=8), 2),
    "gemma2": (tf.Gemma2ForCausalLM, tf.Gemma2Config, dict(_DECODER, head_dim=8), 2),
    "gemma3_text": (tf.Gemma3ForCausalLM, tf.Gemma3TextConfig, dict(_DECODER, head_dim=8), 2),
    "llama-classifier": (tf.LlamaForSequenceClassification, tf.LlamaConfig, dict(_DECODER, pad_token_id=0), 2),
    # OPT-350m's shape: projections in and out of a narrower embedding, no final layer norm
    "opt": (tf.OPTForCausalLM, tf.OPTConfig,
            dict(vocab_size=VOCAB, hidden_size=16, word_embed_proj_dim=8, ffn_dim=32, num_attention_heads=2,
                 max_position_embeddings=64, do_layer_norm_before=False), 3),
    "opt-plain": (tf.OPTForCausalLM, tf.OPTConfig,
                  dict(vocab_size=VOCAB, hidden_size=16, ffn_dim=32, num_attention_heads=2, max_position_embeddings=64), 2),
    "gpt2": (tf.GPT2LMHeadModel, tf.GPT2Config, dict(vocab_size=VOCAB, n_embd=16, n_head=2, n_positions=64), 2),
    "gpt_neox": (tf.GPTNeoXForCausalLM, tf.GPTNeoXConfig,
                 dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_attention_heads=2,
                      max_position_embeddings=64), 3),
    "falcon": (tf.FalconForCausalLM, tf.FalconConfig, dict(vocab_size=VOCAB, hidden_size=16, num_attention_heads=2), 2),
    "phi": (tf.PhiForCausalLM, tf.PhiConfig,
            dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_attention_heads=2,
                 max_position_embeddings=64), 2),
    "bert": (tf.BertForMaskedLM, tf.BertConfig,
             dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_attention_heads=2,
                  max_position_embeddings=64), 3),
    "bert-base": (tf.BertModel, tf.BertConfig,
                  dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_attention_heads=2,
                       max_position_embeddings=64), 2),
    "roberta": (tf.RobertaForMaskedLM, tf.RobertaConfig,
                dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_attention_heads=2,
                     max_position_embeddings=64, pad_token_id=1), 2),
}


def build(name):
    model_class, config_class, kwargs, layers = MODELS[name]
    torch.manual_seed(0)
    return model_class(config_class(num_hidden_layers=layers, **kwargs)).eval()


def layer_count(model):
    return model.config.num_hidden_layers


def batch():
    return torch.randint(2, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))


def call_order(model, layout):
    calls = []
    handles = [block.register_forward_pre_hook(lambda module, args, i=i: calls.append(i))
               for i, (_, block) in enumerate(layout.blocks)]
    try:
        with torch.no_grad():
            model(input_ids=batch())
    finally:
        for handle in handles:
            handle.remove()
    return calls


def test_every_family_in_the_table_is_tested():
    assert set(FAMILIES) == {build(name).config.model_type for name in MODELS}


@pytest.mark.parametrize("name", list(MODELS))
def test_families(name):
    model = build(name)
    layout = find_blocks(model)
    assert len(layout.blocks) == layer_count(model)
    assert call_order(model, layout) == list(range(layer_count(model)))
    modules = dict(model.named_modules())
    for qualified, module in layout.blocks + layout.embeddings + layout.head:
        assert modules[qualified] is module
    assert model.get_submodule(layout.blocks_path) is modules[layout.blocks[0][0].rsplit(".", 1)[0]]
    sections = layout.section_of(model)
    assert list(sections) == [n for n, _ in model.named_parameters()]
    assert "other" not in sections.values(), [n for n, s in sections.items() if s == "other"]
    assert {s for s in sections.values() if s.startswith("block:")} == {f"block:{i}" for i in range(layer_count(model))}
    assert layout.embeddings and layout.head


def test_opt_projections_and_missing_final_norm():
    names = [[n for n, _ in part] for part in (find_blocks(build("opt")).embeddings, find_blocks(build("opt")).head)]
    assert names == [["model.decoder.embed_tokens", "model.decoder.embed_positions", "model.decoder.project_in"],
                     ["model.decoder.project_out", "lm_head"]]


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert"])
def test_tied_head_is_shared_and_reported_as_head(name):
    model = build(name)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    layout = find_blocks(model)
    shared = layout.shared(model)
    assert len(shared) == 1
    assert layout.section_of(model)[shared.pop()] == "head"


def test_untied_head_is_not_shared():
    model = build("qwen2")
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert find_blocks(model).shared(model) == set()


def peft_llama():
    from peft import LoraConfig, get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(build("llama"), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))


@pytest.mark.parametrize("blocks", ["auto", "model.layers"])
def test_peft_model(blocks):
    model = peft_llama()
    layout = find_blocks(model, blocks)
    assert len(layout.blocks) == 3
    assert layout.blocks_path == "model.layers"
    assert layout.blocks[0][0] == "base_model.model.model.layers.0"
    modules = dict(model.named_modules())
    assert all(modules[n] is m for n, m in layout.blocks + layout.embeddings + layout.head)
    sections = layout.section_of(model)
    assert list(sections) == [n for n, _ in model.named_parameters()]
    assert "other" not in sections.values()
    lora = [n for n in sections if "lora_" in n]
    assert lora and all(sections[n].startswith("block:") for n in lora)
    assert call_order(model, layout) == [0, 1, 2]


def test_override_path_splits_around_the_blocks():
    model = build("llama")
    layout = find_blocks(model, "model.layers")
    auto = find_blocks(model)
    assert [n for n, _ in layout.blocks] == [n for n, _ in auto.blocks]
    assert [n for n, _ in layout.embeddings] == ["model.embed_tokens"]
    assert [n for n, _ in layout.head] == ["model.norm", "lm_head"]
    assert layout.section_of(model) == auto.section_of(model)
    assert layout.shared(model) == {"model.embed_tokens.weight"}


def test_override_path_works_outside_the_table():
    class Mystery(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(VOCAB, 8)
            self.stack = nn.ModuleList(nn.Linear(8, 8) for _ in range(4))
            self.out = nn.Linear(8, VOCAB)

    model = Mystery()
    layout = find_blocks(model, "stack")
    assert [n for n, _ in layout.blocks] == [f"stack.{i}" for i in range(4)]
    blocks = {f"stack.{i}.{p}": f"block:{i}" for i in range(4) for p in ("weight", "bias")}
    assert layout.section_of(model) == {"embed.weight": "embeddings", **blocks, "out.weight": "head", "out.bias": "head"}


@pytest.mark.parametrize("path, message", [("model.nope", "has no submodule model.nope"),
                                           ("model.norm", "is a LlamaRMSNorm, not the nn.ModuleList"),
                                           ("", "is a LlamaForCausalLM")])
def test_bad_override_path(path, message):
    with pytest.raises(UserError, match=message) as raised:
        find_blocks(build("llama"), path)
    assert "\n" not in str(raised.value)


class _MysteryConfig(tf.PretrainedConfig):
    model_type = "mystery"


class _MysteryModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.config = _MysteryConfig()
        self.layers = nn.ModuleList([nn.Linear(4, 4)])


def tiny_t5():
    torch.manual_seed(0)
    config = tf.T5Config(vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2)
    return tf.T5ForConditionalGeneration(config)


@pytest.mark.parametrize("make, label", [(tiny_t5, "T5ForConditionalGeneration (t5)"),
                                         (_MysteryModel, "_MysteryModel (mystery)")])
def test_unknown_family_asks_for_blocks(make, label):
    with pytest.raises(UserError, match="--blocks") as raised:
        find_blocks(make())
    message = str(raised.value)
    assert label in message and "\n" not in message
