"""Rebuild the map library that the HTML report inlines, from the npm registry at a pinned version.

The report must open offline, so Leaflet's minified JS/CSS and its licence are checked in under
`footprints/report/assets/` and nothing is fetched when a report is written or opened. This script is how
those files were made, and how anyone can check that they were:

    python -m footprints.report.build_assets            # npm pack leaflet@PINNED, verify, write, compare
    python -m footprints.report.build_assets --check    # offline: the checked-in files against SHA256SUMS
    python -m footprints.report.build_assets --tarball leaflet-1.9.4.tgz   # offline, from a saved tarball

The tarball's sha512 must equal the registry's published integrity (pinned in `pins.py`), and the files
written must equal `assets/SHA256SUMS` byte for byte (`--update-sums` after a deliberate version bump). The
transformations are deterministic: the source-map comment is dropped from the JS (a browser would try to
fetch the map when developer tools open) and the CSS's `url(images/*.png)` become data URIs (an inlined
stylesheet has no folder to resolve them against).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import logging
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from .pins import ASSETS, INTEGRITY, PACKAGE, SUMS, VERSION

log = logging.getLogger(__name__)

__all__ = ["ASSETS", "INTEGRITY", "PACKAGE", "SUMS", "VERSION", "AssetError", "build", "build_files", "check"]
# file written -> member of the tarball it comes from
FILES = {
    "leaflet.js": "package/dist/leaflet.js",
    "leaflet.css": "package/dist/leaflet.css",
    "LICENSE-leaflet.txt": "package/LICENSE",
}


class AssetError(RuntimeError):
    """The tarball or the built files are not the pinned ones."""


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def npm_integrity(data: bytes) -> str:
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()


def fetch_tarball(workdir: Path) -> Path:
    """`npm pack PACKAGE@VERSION` into `workdir` (npm's own registry settings and cache apply)."""
    npm = shutil.which("npm")
    if npm is None:
        raise AssetError("npm is not on PATH (give --tarball to build from a saved tarball)")
    r = subprocess.run(
        [npm, "pack", f"{PACKAGE}@{VERSION}", "--silent", "--pack-destination", str(workdir)],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if r.returncode != 0:
        raise AssetError(f"npm pack {PACKAGE}@{VERSION} failed: {(r.stderr or r.stdout).strip()[-500:]}")
    path = workdir / f"{PACKAGE}-{VERSION}.tgz"
    if not path.is_file():
        raise AssetError(f"npm pack did not write {path.name}")
    return path


def build_files(tarball: bytes) -> dict[str, bytes]:
    """The asset files from the package tarball (verified against the pinned integrity)."""
    got = npm_integrity(tarball)
    if got != INTEGRITY:
        raise AssetError(f"{PACKAGE}-{VERSION}.tgz: integrity {got} is not the pinned {INTEGRITY}")
    with tarfile.open(fileobj=io.BytesIO(tarball), mode="r:gz") as tar:

        def member(name: str) -> bytes:
            f = tar.extractfile(name)
            if f is None:
                raise AssetError(f"{name} missing from the tarball")
            return f.read()

        raw = {out: member(src) for out, src in FILES.items()}
        images = {
            n: member(f"package/dist/images/{n}")
            for n in (
                "layers.png",
                "layers-2x.png",
                "marker-icon.png",
                "marker-icon-2x.png",
                "marker-shadow.png",
            )
        }
    js = re.sub(rb"\n?//# sourceMappingURL=\S+\s*$", b"\n", raw["leaflet.js"])

    def data_uri(m: re.Match[bytes]) -> bytes:
        name = m.group(1).decode()
        if name not in images:
            raise AssetError(f"leaflet.css refers to images/{name}, which the tarball lacks")
        return b"url(data:image/png;base64," + base64.b64encode(images[name]) + b")"

    css = re.sub(rb"url\(images/([\w.-]+)\)", data_uri, raw["leaflet.css"])
    if b"url(images/" in css or b"sourceMappingURL" in js:
        raise AssetError("the transformations left a reference to an external file")
    return {"leaflet.js": js, "leaflet.css": css, "LICENSE-leaflet.txt": raw["LICENSE-leaflet.txt"]}


def read_sums(folder: Path = ASSETS) -> dict[str, str]:
    sums: dict[str, str] = {}
    for line in (folder / SUMS).read_text().splitlines():
        if line.strip():
            digest, name = line.split(maxsplit=1)
            sums[name.strip()] = digest
    return sums


def format_sums(files: dict[str, bytes]) -> str:
    return "".join(f"{sha256(data)}  {name}\n" for name, data in sorted(files.items()))


def check(folder: Path = ASSETS) -> list[str]:
    """Problems with the checked-in assets (empty when every file matches SHA256SUMS)."""
    try:
        sums = read_sums(folder)
    except OSError as err:
        return [f"{folder / SUMS}: {err.strerror or err}"]
    problems = [f"{name}: not listed in {SUMS}" for name in FILES if name not in sums]
    for name, digest in sums.items():
        path = folder / name
        if not path.is_file():
            problems.append(f"{name}: missing")
        elif sha256(path.read_bytes()) != digest:
            problems.append(f"{name}: sha256 differs from {SUMS}")
    return problems


def build(tarball: Path | None = None, folder: Path = ASSETS, update_sums: bool = False) -> dict[str, str]:
    """Build the assets into `folder`; returns {file: sha256}. Refuses output that differs from SHA256SUMS
    unless `update_sums` (a deliberate version bump)."""
    with tempfile.TemporaryDirectory(prefix="leaflet-") as tmp:
        path = tarball if tarball is not None else fetch_tarball(Path(tmp))
        files = build_files(Path(path).read_bytes())
    if not update_sums and (folder / SUMS).is_file():
        pinned = read_sums(folder)
        bad = [n for n, data in files.items() if pinned.get(n) != sha256(data)]
        if bad:
            raise AssetError(
                f"rebuilt {', '.join(bad)} differ from {folder / SUMS} (--update-sums to accept)"
            )
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    (folder / SUMS).write_text(format_sums(files))
    return {n: sha256(d) for n, d in files.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="verify the checked-in assets only (offline)")
    p.add_argument(
        "--tarball", type=Path, help=f"build from this {PACKAGE}-{VERSION}.tgz instead of npm pack"
    )
    p.add_argument("--out", type=Path, default=ASSETS, help="asset folder (default: the package's)")
    p.add_argument("--update-sums", action="store_true", help="accept new file hashes (after a version bump)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.check:
            problems = check(args.out)
            for problem in problems:
                log.error("%s", problem)
            if not problems:
                log.info("%s: every asset matches %s (%s %s)", args.out, SUMS, PACKAGE, VERSION)
            return 1 if problems else 0
        sums = build(args.tarball, args.out, args.update_sums)
    except AssetError as err:
        log.error("%s", err)
        return 1
    for name, digest in sums.items():
        log.info("%s  %s", digest, name)
    log.info("%s %s assets written to %s", PACKAGE, VERSION, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
