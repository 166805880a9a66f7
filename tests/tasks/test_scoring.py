import pytest
import torch

from zotune.assets import models
from zotune.errors import UserError
from zotune.tasks.objectives import evaluate
from zotune.tasks.scoring import Scorer
from zotune.tasks.catalogue import Example, Task

from ..conftest import save_tiny_model


def reference_score(model, tokenizer, prompt, word):
    """Mean log-likelihood of the candidate's tokens, one unpadded sequence at a time."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    cand = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt_ids + cand])
    logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    return sum(logp[len(prompt_ids) - 1 + j, t] for j, t in enumerate(cand)) / len(cand)


@pytest.fixture(params=["llama", "opt", "gpt2"])
def causal(request, tmp_path):
    model, tokenizer, kind = models.load(str(save_tiny_model(tmp_path, request.param)), device="cpu")
    return model, tokenizer, kind


@pytest.mark.parametrize("candidates", [["great", "very good"], ["terrible", "great"]])
def test_causal_scores_match_unpadded_reference(causal, candidates):
    model, tokenizer, kind = causal
    # Prompts (and candidates) of different lengths exercise the padding; single-token
    # candidates take the one-forward-per-prompt path.
    scorer = Scorer(model, tokenizer, candidates, kind)
    prompts = ["the film is good It was", "a dull story It was", "it was"]
    with torch.no_grad():
        scores = scorer.scores(prompts)
        for i, prompt in enumerate(prompts):
            for j, word in enumerate(candidates):
                assert torch.allclose(scores[i, j], reference_score(model, tokenizer, prompt, word), atol=1e-5)


def test_loss_is_cross_entropy_over_candidate_scores_and_differentiable(causal):
    model, tokenizer, kind = causal
    scorer = Scorer(model, tokenizer, ["terrible", "great"], kind)
    prompts, labels = ["the film is good It was", "a dull story It was"], [1, 0]
    loss = scorer.loss(prompts, labels)
    expected = torch.nn.functional.cross_entropy(scorer.scores(prompts), torch.tensor(labels))
    assert torch.allclose(loss, expected)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_long_prompts_are_cut_from_the_left(causal):
    model, tokenizer, kind = causal
    scorer = Scorer(model, tokenizer, ["great"], kind, max_length=6)
    with torch.no_grad():
        long = scorer.scores(["the film " * 20 + "is good It was"])
        short = scorer.scores(["film is good It was"])  # the last 5 tokens
    assert torch.allclose(long, short, atol=1e-5)


def test_masked_lm_scores_the_mask_position(tmp_path):
    model, tokenizer, kind = models.load(str(save_tiny_model(tmp_path, masked=True)), device="cpu")
    assert kind == "masked"
    scorer = Scorer(model, tokenizer, ["terrible", "great"], kind)
    with torch.no_grad():
        scores = scorer.scores(["the film is good It was", "dull"])
        ids = tokenizer("dull [MASK]", return_tensors="pt")["input_ids"]
        logits = model(input_ids=ids).logits[0, ids[0].tolist().index(tokenizer.mask_token_id)]
    words = [tokenizer(" " + w, add_special_tokens=False)["input_ids"][0] for w in ["terrible", "great"]]
    assert torch.allclose(scores[1], torch.log_softmax(logits, -1)[words], atol=1e-5)
    with pytest.raises(UserError, match="single-token"):
        Scorer(model, tokenizer, ["terrible", "very good"], kind)


def test_evaluate_counts_argmax_hits(causal):
    model, tokenizer, kind = causal
    scorer = Scorer(model, tokenizer, ["terrible", "great"], kind)
    examples = [Example(str(i), text, label) for i, (text, label) in
                enumerate([("good fun", 1), ("dull", 0), ("awful", 0), ("lovely", 1), ("weak", 0)])]
    task = Task("t", "{text} It was", ["terrible", "great"], examples, examples)
    with torch.no_grad():
        predicted = scorer.scores([task.prompt(e) for e in examples]).argmax(1).tolist()
    expected = sum(p == e.label for p, e in zip(predicted, examples)) / len(examples)
    assert evaluate(scorer, task, examples, batch_size=2, progress=False)["accuracy"] == expected
    assert model.training is False
