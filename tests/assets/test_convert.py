import json

import numpy as np
import pytest
import torch

from zotune import cli
from zotune.assets import convert
from zotune.assets import models
from zotune.assets.cache import file_sha256
from zotune.errors import UserError

from ..test_cli import CSV_TASK

WORDS = ("Ġgreat", "Ġterrible", "ĠIt", "Ġwas")  # whole tokens, so the verbalisers are one token each


def write_gguf(path, architecture="llama", seed=0, kind="Q8_0"):
    """A 2-block Llama in llama.cpp's format: byte-level BPE tokenizer, ``kind`` matrices, F32 norms."""
    import gguf
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tokens = list(bytes_to_unicode().values())
    merges = []
    for word in WORDS:
        for end in range(2, len(word) + 1):
            merges.append(f"{word[:end - 1]} {word[end - 1]}")
            tokens.append(word[:end])
    tokens.append("<|endoftext|>")
    hidden, heads, kv_heads, ffn, blocks = 64, 4, 2, 128, 2
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_block_count(blocks)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * (len(tokens) - 1) + [3])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(len(tokens) - 1)
    writer.add_eos_token_id(len(tokens) - 1)
    rng = np.random.default_rng(seed)

    def tensor(name, *shape):
        data = (rng.standard_normal(shape) * 0.05).astype(np.float32)
        if len(shape) == 1:
            writer.add_tensor(name, data)
        else:  # quantised as llama.cpp ships most models: the conversion must dequantise
            quantized = gguf.GGMLQuantizationType[kind]
            writer.add_tensor(name, gguf.quants.quantize(data, quantized), raw_dtype=quantized)

    kv = kv_heads * hidden // heads
    tensor("token_embd.weight", len(tokens), hidden)
    for i in range(blocks):
        for name, shape in (("attn_norm", (hidden,)), ("ffn_norm", (hidden,)), ("attn_q", (hidden, hidden)),
                            ("attn_k", (kv, hidden)), ("attn_v", (kv, hidden)), ("attn_output", (hidden, hidden)),
                            ("ffn_gate", (ffn, hidden)), ("ffn_up", (ffn, hidden)), ("ffn_down", (hidden, ffn))):
            tensor(f"blk.{i}.{name}.weight", *shape)
    tensor("output_norm.weight", hidden)
    tensor("output.weight", len(tokens), hidden)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ZOTUNE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    return write_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.Q8_0.gguf")


def test_a_gguf_becomes_a_cached_folder_equal_to_what_transformers_reads(gguf_file, cache, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = convert.gguf_model_dir(gguf_file, progress=False)
    assert folder.parent == cache / "models" / "gguf" and folder.name.startswith("tiny-llama.Q8_0-")
    record = json.loads((folder / convert.MARKER).read_text())
    assert record["sha256"] == file_sha256(gguf_file)
    assert record["dtype"] == "float32" and not list(folder.glob("*.gguf"))

    model, tokenizer, kind = models.load(str(gguf_file), device="cpu")
    assert kind == "causal" and model.dtype == torch.float32 and tokenizer.pad_token is not None
    reference = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name).eval()
    reference_tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    sentence = "The film was great. It was terrible."
    ids = tokenizer(sentence, return_tensors="pt").input_ids
    assert torch.equal(ids, reference_tokenizer(sentence, return_tensors="pt").input_ids)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)
    model.half().save_pretrained(cache / "as-fp16")  # what a GGUF-loaded model refuses

    def refuse(*args):
        raise AssertionError("converted twice")

    monkeypatch.setattr(convert, "save_folder", refuse)
    assert convert.gguf_model_dir(gguf_file, progress=False) == folder


def test_a_changed_file_gets_a_folder_of_its_own(tmp_path, cache):
    path = write_gguf(tmp_path / "m.gguf", seed=0)
    first = convert.gguf_model_dir(path, progress=False)
    write_gguf(path, seed=1)
    second = convert.gguf_model_dir(path, progress=False)
    assert first != second and (first / convert.MARKER).is_file() and (second / convert.MARKER).is_file()


def test_train_takes_a_gguf(gguf_file, cache, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--model", str(gguf_file), *CSV_TASK, "--method", "mezo", "--steps", "2", "--batch-size", "2",
            "--output", str(out), "--no-progress"]
    assert cli.main(args) == 0
    assert "test accuracy" in capsys.readouterr().out
    assert (out / "model" / "config.json").is_file()


def test_memory_reads_only_the_metadata(gguf_file, capsys):
    assert cli.main(["memory", "--model", str(gguf_file)]) == 0
    assert capsys.readouterr().out.splitlines()[0].startswith(f"{gguf_file}: 0.00B parameters, 2 blocks")


def test_bad_files_are_one_line(tmp_path, cache, capsys):
    missing = tmp_path / "nothing.gguf"
    text = tmp_path / "notes.gguf"
    text.write_text("not a model")
    unknown = write_gguf(tmp_path / "odd.gguf", architecture="no-such-architecture")
    for path, expected in ((missing, "does not exist"), (text, "is not a GGUF file"),
                           (unknown, "cannot convert odd.gguf")):
        with pytest.raises(UserError, match=expected) as info:
            convert.gguf_model_dir(path, progress=False)
        assert "\n" not in str(info.value)
    assert cli.main(["train", "--model", str(text), "--no-progress", "--output", str(tmp_path / "o")]) == 2
    assert "is not a GGUF file" in capsys.readouterr().err
    assert not list((cache / "models" / "gguf").glob("odd*"))  # nothing half-converted is kept
