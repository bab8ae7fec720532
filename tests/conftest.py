from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]


def oracle_dir() -> Path:
    env = os.environ.get("EXO_STABLE_ORACLE")
    return Path(env) if env else REPO.parent / "shared" / "oracle"


@pytest.fixture(scope="session")
def oracle() -> dict[str, Any]:
    """llama.cpp's reference data for the default model."""
    path = oracle_dir() / "smollm2-llamacpp.json"
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    """The default model's GGUF, fetched once (``make test`` fetches it before pytest runs)."""
    from exo_stable.engine.store import ensure_default_model

    return ensure_default_model(progress=False)
