"""Where scenes are: discovery under `data.root` (xView2 layout or GeoTIFF folders) and explicit paths.

A `SceneSource` names a scene's image and its labels (an xView2 JSON, a vector file, or a mask raster);
opening and reading it is `footprints.scenes`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from .config import DataConfig
from .errors import InputError

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

    @property
    def scene_id(self) -> str:
        if self.name:
            return self.name
        if self.rows is not None:
            return f"{self.image.stem}__rows{round(100 * self.rows[0]):02d}-{round(100 * self.rows[1]):03d}"
        return self.image.stem

    @property
    def location_id(self) -> str:
        """The image name without the xView2 `_pre_disaster`/`_post_disaster` suffix (splits group on it:
        the pre and post images of a place, and the bands of a scene, share a split)."""
        sid = self.image.stem
        for suffix in ("_pre_disaster", "_post_disaster"):
            if sid.endswith(suffix):
                return sid[: -len(suffix)]
        return sid

    def files(self) -> list[str]:
        return [str(p) for p in (self.image, self.label, self.mask) if p is not None]


# ---------------------------------------------------------------------------------------------------
# discovery


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
    images = sorted(p for p in images_dir.glob(pattern) if p.is_file() and not p.name.startswith("."))
    if cfg.format == "geotiff" and not cfg.image_glob:
        images += sorted(p for p in images_dir.glob("*.tiff") if p.is_file())
    if cfg.format == "xview2" and not cfg.use_post_disaster:
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


def discover_scenes(data_cfg: DataConfig) -> list[SceneSource]:
    """All scenes under `data.root` (in `data.subsets` folders when given), sorted by subset and name.

    A labels (or masks) folder that is absent means an unlabelled dataset: its scenes get `label=None`.
    A labels folder that exists but lacks one scene's file keeps the expected path, so that opening the
    scene reports the missing file by name.
    """
    root = Path(data_cfg.root)
    if not root.is_dir():
        raise InputError(root, "data root not found")
    sources: list[SceneSource] = []
    if data_cfg.subsets:
        for subset in data_cfg.subsets:
            sources += _sources_in(root / subset, subset, data_cfg)
    else:
        sources = _sources_in(root, None, data_cfg)
    seen: dict[str, SceneSource] = {}
    unique = []
    for src in sources:
        if src.scene_id in seen:
            log.warning("%s: duplicate scene id %r (also %s); kept the first", src.image, src.scene_id,
                        seen[src.scene_id].image)
            continue
        seen[src.scene_id] = src
        unique.append(src)
    return unique


def sources_from_paths(paths: list[str | Path], data_cfg: DataConfig) -> list[SceneSource]:
    """Scenes from explicit files or folders (e.g. `predict --input`): labels are looked up beside them
    (`../labels/<stem>.json` for PNGs; `../<labels_dir>` or `../<masks_dir>` for GeoTIFFs) when present."""
    out: list[SceneSource] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix.lower() in RASTER_SUFFIXES | PLAIN_SUFFIXES)
        elif path.is_file():
            files = [path]
        else:
            raise InputError(path, "no such file or folder")
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
    import dataclasses
    from collections import Counter

    seen: dict[Path, SceneSource] = {}
    for src in sources:
        key = src.image.resolve()
        if key in seen:
            log.warning("%s: given more than once; predicted once", src.image)
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
        name = f"{src.image.parent.name}__{src.scene_id}"
        k = 2
        while name in taken or name in counts:
            name = f"{src.image.parent.name}__{src.scene_id}_{k}"
            k += 1
        log.warning("%s: another input image is also named %s; its outputs are named %s", src.image,
                    src.image.name, name)
        out.append(dataclasses.replace(src, name=name))
        taken.add(name)
    return out
