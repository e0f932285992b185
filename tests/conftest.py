"""Shared fixtures. Tests build their own small data; real samples come from ../shared when present."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
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


@pytest.fixture()
def read_only_dir(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A folder nothing can be written into, and the reason a write there fails: a read-only tmpfs mounted
    on it when running as root (root writes through permissions), else mode 0555."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    mounted = False
    if os.geteuid() == 0:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(folder)],
                                 capture_output=True).returncode == 0
        if not mounted:
            pytest.skip("running as root without the right to mount a read-only file system")
    else:
        folder.chmod(0o555)
    try:
        yield folder, "read-only file system" if mounted else "permission denied"
    finally:
        if mounted:
            subprocess.run(["umount", str(folder)], capture_output=True)
        else:
            folder.chmod(0o755)  # so that pytest can remove it


@pytest.fixture(scope="module")
def browser():
    """A headless Chromium for the report's browser tests (`browser_harness`), one per test module; skips
    where none can be started."""
    from browser_harness import BrowserUnavailable, start_browser

    try:
        b = start_browser()
    except BrowserUnavailable as err:
        pytest.skip(f"no headless Chromium: {err}")
    yield b
    b.close()
