"""Opening untrusted rasters for reading: only imagery formats, only local files, one-line errors naming the file.

GDAL opens far more than imagery. A VRT (XML, whatever its file name says) reads pixels from any file the
process can read or from any URL; `/vsicurl/` and friends make GDAL send requests. So, here:

- a path must name a local file: `/vsi...` paths and URLs are refused (`check_local`), and so are folders,
  named pipes, devices, symlink loops and dangling symlinks (`check_regular_file`);
- the format is decided from the file's first bytes, never from its name (`sniff_raster`), and GDAL may use
  that one driver only (`ALLOWED_DRIVERS`: GeoTIFF/COG, PNG, JPEG, JPEG 2000, none of which references
  other files or URLs); the driver GDAL actually used is checked again;
- while opening, GDAL's network file systems accept no file name (`CPL_VSIL_CURL_ALLOWED_FILENAME`);
- a file name that is not UTF-8 (rasterio and pyogrio pass UTF-8 to GDAL) is opened through a temporary
  symlink with an ASCII name (`gdal_name`), together with its sidecar files (`.aux.xml`, world files, ...);
- an image whose declared size is out of all proportion to its file (a decompression bomb, or a sparse
  file of empty blocks) is refused before anything is read (`MAX_COMPRESSION`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import stat
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import rasterio
from rasterio.errors import NotGeoreferencedWarning, RasterioError

from ..errors import InputError, one_line, printable

# file signature -> (GDAL driver, what a user calls it)
_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"II*\x00", "GTiff"),
    (b"MM\x00*", "GTiff"),
    (b"II+\x00", "GTiff"),  # BigTIFF
    (b"MM\x00+", "GTiff"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JP2OpenJPEG"),  # JP2 file
    (b"\xff\x4f\xff\x51", "JP2OpenJPEG"),  # JPEG 2000 codestream
)
ALLOWED_DRIVERS = {"GTiff": "GeoTIFF", "PNG": "PNG", "JPEG": "JPEG", "JP2OpenJPEG": "JPEG 2000"}
# what a refused file is, from its first bytes (for the error message)
_KNOWN = ((b"<VRTDataset", "a GDAL VRT (XML that points at other files or URLs)"),
          (b"<OGRVRTDataSource", "an OGR VRT (XML that points at other files or URLs)"),
          (b"EHFA_HEADER_TAG", "an ERDAS Imagine .img (it may point at other files)"),
          (b"SQLite format 3", "an SQLite/GeoPackage database"),
          (b"<", "an XML/HTML document"),
          (b"{", "a JSON document"),
          (b"%PDF", "a PDF document"),
          (b"GIF8", "a GIF image"),
          (b"BM", "a BMP image"))
# an image declaring more than this many bytes per byte of file is refused (when it declares more than
# `_BOMB_MIN_BYTES`): deflate (PNG, most GeoTIFFs) cannot compress more than ~1032:1, JPEG far less, and
# real imagery, even a mosaic that is mostly nodata, stays well below that (an image's ratio: width x height
# x bands x bytes per sample, from `gdalinfo`, over the file's size)
MAX_COMPRESSION = 1000
_BOMB_MIN_BYTES = 1 << 30
# the network file systems (/vsicurl/, /vsis3/, ...) accept only this file name while we open: none
_NO_NETWORK = {"CPL_VSIL_CURL_ALLOWED_FILENAME": "/footprints-reads-local-files-only"}
# a URL scheme ("http://", "s3://"; a Path keeps one slash: "http:/"), two letters or more (not "C:/")
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:/")


def check_local(path: str | Path, what: str = "file") -> None:
    """Refuse GDAL virtual file systems (`/vsicurl/...`, `/vsizip/...`) and URLs: inputs are local files."""
    text = os.fsdecode(os.fspath(path))
    for form in (text, os.path.abspath(text)):
        if form.startswith("/vsi") or _URL.match(form):
            raise InputError(printable(text), f"{what} is a URL or a GDAL virtual file system path; only "
                                              "local files are read")


def check_regular_file(path: Path, what: str, missing: str | None = None) -> os.stat_result:
    """`path` is a local regular file (symlinks followed); else one InputError saying what it is instead.

    `missing` is the reason given when nothing is there (default: '<what> file not found')."""
    check_local(path, what)
    try:
        st = os.stat(path)
    except OSError as err:
        if os.path.islink(path):
            try:
                target = os.readlink(path)
            except OSError:
                target = "?"
            if err.errno == errno.ELOOP:
                raise InputError(printable(path), f"{what} is a symlink loop") from None
            raise InputError(printable(path), f"{what} is a broken symlink (its target {printable(target)} "
                                              "does not exist)") from None
        if isinstance(err, FileNotFoundError):
            raise InputError(printable(path), missing or f"{what} file not found") from None
        raise InputError(printable(path), f"cannot read {what} ({err.strerror or err})") from None
    if stat.S_ISDIR(st.st_mode):
        raise InputError(printable(path), f"{what} is a folder, not a file")
    if not stat.S_ISREG(st.st_mode):
        kind = "a named pipe" if stat.S_ISFIFO(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode) else "a device"
        raise InputError(printable(path), f"{what} is {kind}, not a regular file (not read)")
    return st


def _head(path: Path, n: int = 64) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except OSError as err:
        raise InputError(printable(path), f"cannot read ({err.strerror or err})") from None


def sniff_raster(path: Path) -> str | None:
    """The GDAL driver of an imagery file from its first bytes, or None when it is no format we read."""
    head = _head(path)
    for magic, driver in _SIGNATURES:
        if head.startswith(magic):
            return driver
    return None


def describe_head(head: bytes) -> str:
    """What a file is, from its first bytes, in a few words (for refusals)."""
    stripped = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    for magic, words in _KNOWN:
        if stripped.startswith(magic):
            return words
    return "an unknown format"


@contextlib.contextmanager
def gdal_name(path: Path) -> Iterator[str]:
    """A name GDAL can open for `path`: its absolute path (so that no relative name is read as a GDAL
    `PREFIX:...` dataset string), or, for a file name that is not UTF-8, a symlink with an ASCII name in a
    private temporary folder, beside links to the file's sidecars (same stem, any suffix: `.aux.xml`, world
    files, `.dbf`...), removed on exit (GDAL keeps the files it opened open)."""
    text = os.path.abspath(os.fspath(path))
    if _utf8(text):
        yield text
        return
    folder = tempfile.mkdtemp(prefix="footprints-name-")
    try:
        src = Path(text)
        stem = src.name.split(".")[0]
        main = "input" + src.name[len(stem):]
        main = main if _utf8(main) else "input"
        os.symlink(os.fsencode(src), os.path.join(folder, main))
        with contextlib.suppress(OSError):
            for sib in src.parent.iterdir():
                alias = "input" + sib.name[len(stem):]
                if sib != src and sib.name.startswith(stem + ".") and _utf8(alias) and alias != main:
                    os.symlink(os.fsencode(sib), os.path.join(folder, alias))
        yield os.path.join(folder, main)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_declared_size(path: Path, ds: Any, file_bytes: int) -> None:
    itemsize = max((_itemsize(d) for d in ds.dtypes), default=1)
    declared = ds.width * ds.height * max(ds.count, 1) * itemsize
    if declared > _BOMB_MIN_BYTES and declared > MAX_COMPRESSION * max(file_bytes, 1):
        raise InputError(printable(path), f"declares {ds.width}x{ds.height} px x {ds.count} band(s) "
                         f"({declared / 2**30:.1f} GiB) in a file of {file_bytes / 2**20:.1f} MiB: more than "
                         f"{MAX_COMPRESSION}:1 is no real image (a decompression bomb, or a sparse file of "
                         "empty blocks); not read")


def _itemsize(dtype: str) -> int:
    import numpy as np

    try:
        return int(np.dtype(dtype).itemsize)
    except TypeError:
        return 1


def open_raster(path: Path, what: str) -> Any:
    """rasterio.open of a local GeoTIFF/PNG/JPEG/JPEG 2000 file, decided from its content, without the PNG
    georeference warning; anything else (a VRT, whatever its name, a URL, a pipe) is a one-line InputError.
    An image ('image') declaring an absurd size for its file is refused too (`MAX_COMPRESSION`)."""
    st = check_regular_file(path, what, missing=f"{what} file not found")
    if st.st_size == 0:
        raise InputError(printable(path), f"empty {what}: the file has 0 bytes")
    driver = sniff_raster(path)
    if driver is None:
        raise InputError(printable(path), f"not a GeoTIFF, PNG, JPEG or JPEG 2000 {what}: the file is "
                                      f"{describe_head(_head(path))}; other formats are not read")
    try:
        with warnings.catch_warnings(), rasterio.Env(**_NO_NETWORK), gdal_name(path) as name:
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            ds = rasterio.open(name, driver=driver)
    except RasterioError as err:
        raise InputError(printable(path), f"unreadable {what} ({printable(one_line(err))})") from None
    if ds.driver != driver:  # cannot happen with driver=; kept so that a change in rasterio cannot open a VRT
        ds.close()
        raise InputError(printable(path), f"opened as {ds.driver}, not {ALLOWED_DRIVERS[driver]}; not read")
    if what == "image":
        try:
            _check_declared_size(path, ds, st.st_size)
        except InputError:
            ds.close()
            raise
    return ds
