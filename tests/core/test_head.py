"""The candidate head: starts as the model, corrects only its tokens, reads features by their RMS, and a record of
one forward gives the logits of any correction."""

import pytest
import torch

from zotune.core.head import CandidateHead, add_head, find_head, remove_head

from ..conftest import VOCAB, tiny_model


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2"])
def test_a_new_head_changes_nothing_and_a_trained_one_only_its_tokens(family):
    model = tiny_model(family)
    ids = torch.randint(0, VOCAB, (3, 7), generator=torch.Generator().manual_seed(0))
    before = model(input_ids=ids).logits
    embedding = model.get_input_embeddings().weight.detach().clone()
    head = add_head(model, [5, 9, 5])
    assert find_head(model) is head and head.token_ids.tolist() == [5, 9]
    assert torch.equal(model(input_ids=ids).logits, before)
    with torch.no_grad():
        head.delta.normal_(generator=torch.Generator().manual_seed(1))
        head.bias.fill_(0.5)
    after = model(input_ids=ids).logits
    others = [t for t in range(VOCAB) if t not in (5, 9)]
    assert torch.equal(after[..., others], before[..., others])
    assert not torch.allclose(after[..., [5, 9]], before[..., [5, 9]])
    # Tied input embeddings are untouched: the words read as before in a prompt.
    assert torch.equal(model.get_input_embeddings().weight, embedding)


def test_the_feature_scale_is_the_rms_of_random_tokens_the_same_in_every_model_built_alike():
    a, b = tiny_model("llama"), tiny_model("llama")
    head_a, head_b = add_head(a, [3]), add_head(b, [3])
    assert torch.equal(head_a.scale, head_b.scale)
    assert head_a.scale.shape == (32,) and (head_a.scale > 0).all()
    assert not torch.allclose(head_a.scale, torch.ones(32))
    # The correction reads hidden / scale: a unit direction of delta moves each logit by the standardised feature.
    hidden = torch.randn(2, 32)
    with torch.no_grad():
        head_a.delta.zero_()
        head_a.delta[0, 4] = 1.0
    logits = head_a.adjust(hidden, torch.zeros(2, VOCAB))
    assert torch.allclose(logits[:, 3], hidden[:, 4] / head_a.scale[4])


def test_a_recorded_forward_gives_the_logits_of_any_correction():
    model = tiny_model("llama")
    head = add_head(model, [1, 2])
    ids = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(3))
    with head.capturing() as record:
        model(input_ids=ids)
    assert len(record) == 1
    with torch.no_grad():
        head.delta.uniform_(-1, 1, generator=torch.Generator().manual_seed(4))
    assert torch.equal(head(*record[0]), model(input_ids=ids).logits)
    assert head._record is None  # capturing ends with its block


def test_trunk_frozen_sees_only_parameters_outside_delta_and_bias():
    model = tiny_model("llama")
    head = add_head(model, [1])
    assert not head.trunk_frozen(model)  # a fresh model trains everything
    for param in model.parameters():
        param.requires_grad_(False)
    for param in head.own_parameters():
        param.requires_grad_(True)
    assert head.trunk_frozen(model)
    model.get_output_embeddings().output.weight.requires_grad_(True)  # the wrapped layer is the trunk's
    assert not head.trunk_frozen(model)


def test_a_model_without_a_linear_output_layer_is_refused():
    model = tiny_model("llama")
    model.lm_head = torch.nn.Identity()
    with pytest.raises(ValueError, match="no linear output layer"):
        add_head(model, [1])
    assert isinstance(add_head(tiny_model("gpt2"), [1]), CandidateHead)


def test_a_head_on_a_block_reads_that_block_at_the_positions_the_output_layer_reads():
    model = tiny_model("llama")
    block = model.model.layers[0]
    outputs = []
    block.register_forward_hook(lambda module, args, output: outputs.append(output[0] if isinstance(output, tuple)
                                                                            else output))
    head = add_head(model, [4], source=block)
    outputs.clear()
    ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        head.delta.normal_(generator=torch.Generator().manual_seed(6))
    with head.capturing() as record:
        logits = model(input_ids=ids, logits_to_keep=1).logits
    read = outputs[0][:, -1:]
    assert torch.equal(record[0][0], read)
    assert torch.allclose(logits[..., 4], record[0][1][..., 4] + head.correction(read)[..., 0])
    assert torch.equal(head(*record[0]), logits)


def test_a_block_of_another_width_is_refused_and_the_model_left_as_it_was():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="64 wide, the output layer reads 32"):
        add_head(model, [1], source=model.model.layers[0].mlp.gate_proj)
    assert isinstance(model.lm_head, torch.nn.Linear)
    assert not model.model.layers[0].mlp.gate_proj._forward_hooks


def test_remove_head_gives_the_model_its_output_layer_and_its_block_back():
    model = tiny_model("llama")
    output, block = model.lm_head, model.model.layers[0]
    add_head(model, [1], source=block)
    remove_head(model)
    assert model.lm_head is output and find_head(model) is None and not block._forward_hooks
