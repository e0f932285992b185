"""Shared fixtures. Tests build their own small data; real samples come from ../shared when present."""

from __future__ import annotations

from pathlib import Path

import pytest

# the session-scoped `slurm_cluster` fixture (a real one-node SLURM cluster) lives in its own plugin
pytest_plugins = ["conftest_slurm"]

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The read-only ../shared folder beside the checkout; tests using it skip when it is absent."""
    if not (SHARED / "data").is_dir():
        pytest.skip(f"{SHARED} is absent (real sample data and weights live there)")
    return SHARED


@pytest.fixture(scope="session")
def vgg_weights(shared_dir: Path) -> Path:
    path = shared_dir / "weights" / "vgg16_features_rgb_caffe.pth"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    return path
