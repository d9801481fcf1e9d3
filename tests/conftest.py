"""Shared fixtures. The real bAbI data lives outside the repo (../shared/data/babi, CC BY 3.0)."""

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def babi_root() -> Path:
    return Path(os.environ.get("DISENTANGLE_BABI_ROOT", REPO.parent / "shared" / "data" / "babi"))


@pytest.fixture(scope="session")
def babi_en() -> Path:
    """The 1k bAbI directory. Missing data skips locally but fails in CI, so it is never skipped silently."""
    path = babi_root() / "en"
    if not path.is_dir():
        message = f"real bAbI data not found at {path} (set DISENTANGLE_BABI_ROOT)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
