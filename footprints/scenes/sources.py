"""Where scenes are: discovery under `data.root` (xView2 layout or GeoTIFF folders) and explicit paths.

A `SceneSource` names a scene's image and its labels (an xView2 JSON, a vector file, or a mask raster);
opening and reading it is `footprints.scenes.reader`.

Folders are untrusted too: hidden files (`.x`, and the `._x.tif` AppleDouble files macOS leaves on other
file systems) are left out; anything else with an image's name that is no regular file (a folder, a named
pipe, a dangling symlink) is kept, so that opening it names it and says why, one line, while the other
scenes go on; a symlink loop is said at discovery, one line, and left out. Symlinks are followed, also out of the folder: the user running footprints can read
their targets anyway, and only real imagery is read from them (`footprints.scenes.rasters`). A file name that is not
UTF-8 keeps its bytes (Python's surrogate escapes); its scene id shows them as `%XX` (`safe_id`) so that every
output name and message can be written. `data.root` and `--input` must be local paths, not URLs or GDAL
`/vsi...` paths.

Several sources in one run (`data.sources`): each entry's keys override the `data:` section's for its scenes
(`source_config`); its scenes carry the source's name (`<name>__<scene>`, also in their location id, so that
splits group within a source) and that merged config (`SceneSource.data`, what reads them: `scene_config`).
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..config import DataConfig
from ..config.schema import SourceConfig
from ..errors import InputError, printable
from .rasters import check_local, check_regular_file

log = logging.getLogger(__name__)

RASTER_SUFFIXES = {".tif", ".tiff", ".vrt", ".img", ".jp2"}
PLAIN_SUFFIXES = {".png", ".jpg", ".jpeg"}
_VECTOR_SUFFIXES = (".geojson", ".gpkg", ".json", ".shp")


@dataclass(frozen=True)
class SceneSource:
    """Where a scene's files are. `label` is an xView2 JSON or a vector file, `mask` a raster."""

    image: Path
    label: Path | None = None
    mask: Path | None = None
    subset: str | None = None
    # "xview2" (label JSON with xy/lng_lat WKT) or "vector"; None = inferred from the label's suffix
    label_kind: str | None = None
    # a band of the scene's rows, as fractions of its height (start, stop): the scene is that band alone
    # (e.g. the validation band of a training scene, `tile.val_band`)
    rows: tuple[float, float] | None = None
    # the scene's id when its image name is not enough (two folders holding the same file name)
    name: str | None = None
    # the `data.sources` entry the scene comes from (its name prefixes the scene and location ids), and the
    # `data:` settings with that entry's keys on top (what reads the scene); None: the one source `data.root`
    source_name: str | None = None
    data: DataConfig | None = field(default=None, compare=False, hash=False, repr=False)

    @property
    def scene_id(self) -> str:
        if self.name:
            return safe_id(self.name)
        stem = safe_id(self.image.stem)
        if self.rows is not None:
            stem = f"{stem}__rows{round(100 * self.rows[0]):02d}-{round(100 * self.rows[1]):03d}"
        return self._prefixed(stem)

    @property
    def location_id(self) -> str:
        """The image name without the xView2 `_pre_disaster`/`_post_disaster` suffix (splits group on it:
        the pre and post images of a place, and the bands of a scene, share a split)."""
        sid = self.image.stem
        for suffix in ("_pre_disaster", "_post_disaster"):
            if sid.endswith(suffix):
                return self._prefixed(sid[: -len(suffix)])
        return self._prefixed(sid)

    def _prefixed(self, text: str) -> str:
        return f"{self.source_name}__{text}" if self.source_name else text

    def files(self) -> list[str]:
        return [str(p) for p in (self.image, self.label, self.mask) if p is not None]


def safe_id(name: str) -> str:
    """A file name as a scene id every output can carry: the bytes of a name that is not UTF-8, and control
    characters, as `%XX` (`caf\\xe9.tif` -> `caf%E9`); any other name as it is."""
    if name.isprintable():
        return name
    out = []
    for ch in name:
        if 0xDC80 <= ord(ch) <= 0xDCFF:  # a byte that was not UTF-8 (surrogateescape)
            out.append(f"%{ord(ch) - 0xDC00:02X}")
        elif ord(ch) < 32 or ord(ch) == 127 or 0xD800 <= ord(ch) <= 0xDFFF:
            out.append("".join(f"%{b:02X}" for b in ch.encode("utf-8", "surrogatepass")))
        else:
            out.append(ch)
    return "".join(out)


# ---------------------------------------------------------------------------------------------------
# discovery


def _hidden(path: Path) -> bool:
    """A hidden file (`.x`), e.g. a macOS AppleDouble `._x.tif` (resource fork, not an image)."""
    return path.name.startswith(".")


def _visible(paths: list[Path], folder: Path) -> list[Path]:
    """`paths` less the hidden files (said in one debug line), sorted."""
    hidden = [p for p in paths if _hidden(p)]
    if hidden:
        log.debug("%s: %d hidden file(s) left out (e.g. %s)", printable(folder), len(hidden),
                  printable(hidden[0].name))
    return sorted(p for p in paths if not _hidden(p))


def _kept(path: Path) -> bool:
    """A regular file, or something with an image's name that is not one (a folder, a pipe, a dangling
    symlink): kept so that opening it names it and says why. A symlink loop is said here, in one error line,
    and left out (it names no file at all, and resolving it fails everywhere); plain absence is dropped."""
    if not os.path.lexists(path):
        return False
    if path.is_symlink():
        try:
            os.stat(path)
        except OSError as err:
            if err.errno == errno.ELOOP:
                log.error("%s: image is a symlink loop (skipped)", printable(path))
                return False
    return True


def _is_post(path: Path) -> bool:
    return "_post_disaster" in path.stem


def _vector_label(labels_dir: Path, stem: str) -> Path:
    for suffix in _VECTOR_SUFFIXES:
        if (labels_dir / f"{stem}{suffix}").is_file():
            return labels_dir / f"{stem}{suffix}"
    return labels_dir / f"{stem}.geojson"  # missing: open_scene says so, naming this path


def _sources_in(folder: Path, subset: str | None, cfg: DataConfig) -> list[SceneSource]:
    images_dir = folder / cfg.images_dir
    if not images_dir.is_dir():
        raise InputError(images_dir, "images folder not found")
    pattern = cfg.image_glob or ("*.png" if cfg.format == "xview2" else "*.tif")
    found = list(images_dir.glob(pattern))
    if cfg.format == "geotiff" and not cfg.image_glob:
        found += list(images_dir.glob("*.tiff"))
    images = [p for p in _visible(found, images_dir) if _kept(p)]
    if not cfg.use_post_disaster:  # either layout: a post-disaster scene is not a scene to find buildings in
        skipped = [p for p in images if _is_post(p)]
        if skipped:
            log.debug("%s: %d post-disaster images left out (data.use_post_disaster: false)", images_dir,
                      len(skipped))
        images = [p for p in images if not _is_post(p)]
    labels_dir = folder / cfg.labels_dir
    masks_dir = folder / cfg.masks_dir
    out = []
    for img in images:
        label = mask = None
        kind = None
        if cfg.format == "xview2":
            if labels_dir.is_dir():
                label, kind = labels_dir / f"{img.stem}.json", "xview2"
        elif cfg.label_format == "mask":
            if masks_dir.is_dir():
                mask = masks_dir / img.name
                if not mask.is_file():
                    alt = sorted(masks_dir.glob(f"{img.stem}.tif*"))
                    mask = alt[0] if alt else mask
        elif labels_dir.is_dir():
            label, kind = _vector_label(labels_dir, img.stem), "vector"
        out.append(SceneSource(img, label, mask, subset, kind))
    return out


def source_config(data_cfg: DataConfig, entry: SourceConfig) -> DataConfig:
    """The `data:` settings of one `data.sources` entry: the section's values with the entry's own on top."""
    own = {f.name: getattr(entry, f.name) for f in dataclasses.fields(entry)
           if f.name != "name" and getattr(entry, f.name) is not None}
    return dataclasses.replace(data_cfg, **own, sources=[])


def data_sections(data_cfg: DataConfig) -> list[tuple[str, str | None, DataConfig]]:
    """(key prefix, name, settings) of each data source: the `data.sources` entries, else `data:` itself."""
    if not data_cfg.sources:
        return [("data.", None, data_cfg)]
    return [(f"data.sources[{i}].", e.name, source_config(data_cfg, e)) for i, e in enumerate(data_cfg.sources)]


def scene_config(source: SceneSource, data_cfg: DataConfig) -> DataConfig:
    """The settings that read `source`: its data source's (`data.sources`), else `data_cfg`."""
    return source.data if source.data is not None else data_cfg


def discover_scenes(data_cfg: DataConfig) -> list[SceneSource]:
    """All scenes under `data.root` (in `data.subsets` folders when given), sorted by subset and name; with
    `data.sources`, every source's scenes in the order of the list, their ids prefixed with the source's name.

    A labels (or masks) folder that is absent means an unlabelled dataset: its scenes get `label=None`.
    A labels folder that exists but lacks one scene's file keeps the expected path, so that opening the
    scene reports the missing file by name.
    """
    if data_cfg.sources:
        configs = data_sections(data_cfg)
        for where, name, cfg in configs:  # every root checked before any folder is listed
            check_local(cfg.root, f"{where}root")
            if not Path(cfg.root).is_dir():
                raise InputError(printable(cfg.root), f"root of data source {name!r} ({where}root) not found")
        sources = [dataclasses.replace(s, source_name=name, data=cfg)
                   for _, name, cfg in configs for s in _discover_root(cfg)]
    else:
        check_local(data_cfg.root, "data.root")
        if not Path(data_cfg.root).is_dir():
            raise InputError(printable(Path(data_cfg.root)), "data root not found")
        sources = _discover_root(data_cfg)
    seen: dict[str, SceneSource] = {}
    unique = []
    for src in sources:
        if src.scene_id in seen:
            log.warning("%s: duplicate scene id %r (also %s); kept the first", printable(src.image), src.scene_id,
                        printable(seen[src.scene_id].image))
            continue
        seen[src.scene_id] = src
        unique.append(src)
    return unique


def _discover_root(data_cfg: DataConfig) -> list[SceneSource]:
    """The scenes under one root (an existing folder), in its `subsets` folders when given."""
    root = Path(data_cfg.root)
    if data_cfg.subsets:
        return [s for subset in data_cfg.subsets for s in _sources_in(root / subset, subset, data_cfg)]
    return _sources_in(root, None, data_cfg)


def source_names(sources: list[SceneSource]) -> list[str]:
    """The data sources the scenes come from, in order of first appearance (empty: the one `data.root`)."""
    return list(dict.fromkeys(s.source_name for s in sources if s.source_name))


def sources_from_paths(paths: list[str | Path], data_cfg: DataConfig) -> list[SceneSource]:
    """Scenes from explicit files or folders (e.g. `predict --input`): labels are looked up beside them
    (`../labels/<stem>.json` for PNGs; `../<labels_dir>` or `../<masks_dir>` for GeoTIFFs) when present."""
    out: list[SceneSource] = []
    for raw in paths:
        check_local(raw, "input")
        path = Path(raw)
        if path.is_dir():
            try:
                entries = list(path.iterdir())
            except OSError as err:
                raise InputError(printable(path), f"cannot list the folder ({err.strerror or err})") from None
            named = [p for p in entries if p.suffix.lower() in RASTER_SUFFIXES | PLAIN_SUFFIXES]
            files = [p for p in _visible(named, path) if _kept(p)]
        elif os.path.lexists(path):
            if path.is_symlink() and not path.exists():
                check_regular_file(path, "input")  # a symlink loop or a dangling symlink: says which
            files = [path]
        else:
            raise InputError(printable(path), "no such file or folder")
        for img in files:
            parent = img.parent.parent
            label = mask = kind = None
            if img.suffix.lower() in PLAIN_SUFFIXES:
                cand = parent / data_cfg.labels_dir / f"{img.stem}.json"
                if cand.is_file():
                    label, kind = cand, "xview2"
            else:
                cand = _vector_label(parent / data_cfg.labels_dir, img.stem)
                mcand = parent / data_cfg.masks_dir / img.name
                if data_cfg.label_format == "mask" and mcand.is_file() and mcand != img:
                    mask = mcand
                elif cand.is_file():
                    label, kind = cand, "vector"
            out.append(SceneSource(img, label, mask, None, kind))
    return out


def unique_sources(sources: list[SceneSource]) -> list[SceneSource]:
    """Each image once, each scene id once: the same file given twice is kept once (with a warning); two
    different files with the same name (`A/scene.tif`, `B/scene.tif`) get ids that say their folder
    (`A__scene`, `B__scene`), so that neither overwrites the other's outputs."""
    from collections import Counter

    seen: dict[Path, SceneSource] = {}
    for src in sources:
        try:
            key = src.image.resolve()
        except (OSError, RuntimeError):  # a symlink loop: opening it says so
            key = Path(os.path.abspath(src.image))
        if key in seen:
            log.warning("%s: given more than once; predicted once", printable(src.image))
            continue
        seen[key] = src
    kept = list(seen.values())
    counts = Counter(s.scene_id for s in kept)
    out: list[SceneSource] = []
    taken: set[str] = set()
    for src in kept:
        if counts[src.scene_id] == 1:
            out.append(src)
            taken.add(src.scene_id)
            continue
        name = safe_id(f"{src.image.parent.name}__{src.scene_id}")
        k = 2
        while name in taken or name in counts:
            name = safe_id(f"{src.image.parent.name}__{src.scene_id}_{k}")
            k += 1
        log.warning("%s: another input image is also named %s; its outputs are named %s", printable(src.image),
                    printable(src.image.name), name)
        out.append(dataclasses.replace(src, name=name))
        taken.add(name)
    return out
