import os

import pytest
import torch

# Before anything imports triton (transformers does): without a GPU, zotune's Triton
# kernels are tested on the CPU through Triton's interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

VOCAB = 96


def tiny_model(family: str, dtype=torch.float32, seed: int = 0):
    """A random-init causal LM of a few tens of thousands of parameters, in eval mode."""
    torch.manual_seed(seed)
    if family == "llama":
        config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
        model = LlamaForCausalLM(config)
    elif family == "opt":
        config = OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                           num_attention_heads=4, max_position_embeddings=32, word_embed_proj_dim=32)
        model = OPTForCausalLM(config)
    elif family == "gpt2":
        config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=32)
        model = GPT2LMHeadModel(config)
    else:
        raise ValueError(family)
    return model.to(dtype).eval()


def lm_closure(model, seed: int = 0, batch: int = 4, length: int = 12):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, length), generator=generator)
    return lambda: model(input_ids=ids, labels=ids).loss


def snapshot(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def assert_replays_and_resumes(tmp_path, options: dict, steps: int = 6):
    """A MeZO run of ``steps`` on a tiny model with ``options`` gives the same weights replayed from its trajectory,
    and resumed halfway from its state dict onto weights replayed that far."""
    import zotune

    model = tiny_model("llama")
    optimizer = zotune.MeZO(model.named_parameters(), **options)
    half = steps // 2
    for step in range(half):
        optimizer.step(lm_closure(model, seed=step))
    state = optimizer.state_dict()
    for step in range(half, steps):
        optimizer.step(lm_closure(model, seed=step))
    optimizer.trajectory.save(tmp_path / "trajectory.json")
    replayed = tiny_model("llama")
    zotune.replay(replayed.named_parameters(), tmp_path / "trajectory.json")
    assert_same(snapshot(replayed), snapshot(model))
    resumed = tiny_model("llama")
    recorded = optimizer.trajectory.to_dict()
    zotune.replay(resumed.named_parameters(), {**recorded, "steps": recorded["steps"][:half]})
    again = zotune.MeZO(resumed.named_parameters(), **options)
    again.load_state_dict(state)
    for step in range(half, steps):
        again.step(lm_closure(resumed, seed=step))
    assert_same(snapshot(resumed), snapshot(model))


FAMILIES = ["llama", "opt", "gpt2"]


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


def restore(model, weights: dict):
    """Copy a snapshot back in (tied weights are one parameter, so load_state_dict would miss them)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(weights[name])


DATA = __import__("pathlib").Path(__file__).parent / "data"
WORDS = ["the", "film", "is", "a", "story", "with", "actors", "and", "plot", "very", "quite", "good", "fun",
         "lovely", "moving", "smart", "warm", "bad", "dull", "awful", "boring", "weak", "cold", "it", "was",
         "terrible", "great", "neutral", "It", "review", ":", "."]


def save_tiny_model(folder, family: str = "llama", masked: bool = False):
    """A random-init model + word-level tokenizer saved as a Hugging Face folder (no downloads)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, BertForMaskedLM, PreTrainedTokenizerFast

    special = ["[PAD]", "[UNK]", "[MASK]", "[EOS]"]
    vocab = {word: i for i, word in enumerate(special + WORDS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]",
                                        mask_token="[MASK]", eos_token="[EOS]")
    if masked:
        torch.manual_seed(0)
        model = BertForMaskedLM(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                           num_attention_heads=4, intermediate_size=64, max_position_embeddings=64))
    else:
        model = tiny_model(family)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


def stop_after(monkeypatch, steps):
    """Ctrl-C after each 0-based step in ``steps`` (the signal handler only sets the flag),
    however often the run is resumed; returns the unpatched ``Run.train_step``."""
    import signal

    from zotune.recipe.train import Run

    original = Run.train_step

    def step_then_stop(self, step):
        record = original(self, step)
        self._stop = signal.SIGINT if step in steps else False
        return record

    monkeypatch.setattr(Run, "train_step", step_then_stop)
    return original
