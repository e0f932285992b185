"""Stage names and the files every stage writes: `<output_root>/<name>/<stage>/...`.

The names are the ones a user types (`footprints train-segmenter`), so the folder of a stage is its name.

Output paths a user gives (`predict --output`, `report --output`) are checked here before anything is
written (`check_output_text`, `check_writable`, `same_file`): no control characters, a folder that can be
written, and never the same file as an input. Per-scene files never share a name with the files of the run
itself: in the run's `predict/` folder the scene ids of `RESERVED_SCENE_IDS` are refused
(`reserved_scene_id`); `predict --input` keeps its scenes in their own folder (`<stem>_scenes/`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import StageError, printable

TILE = "tile"
FEATURES = "features"
TRAIN_CLASSIFIER = "train-classifier"
TRAIN_SEGMENTER = "train-segmenter"
PREDICT = "predict"
EVALUATE = "evaluate"
TRAIN_DAMAGE = "train-damage"
DAMAGE = "damage"
STAGES = (TILE, FEATURES, TRAIN_CLASSIFIER, TRAIN_SEGMENTER, PREDICT, TRAIN_DAMAGE, DAMAGE, EVALUATE)
DAMAGE_STAGES = (TRAIN_DAMAGE, DAMAGE)  # run only when the config has a `damage:` section
CV = "cv"  # cross-validation summary of `footprints cv`
REPORT = "report"


@dataclass(frozen=True)
class RunPaths:
    """Every path of one run (`<output_root>/<name>`). Nothing is created here."""

    root: Path

    @classmethod
    def of(cls, cfg: Any) -> RunPaths:
        """The run folder of a `Config` (`output_root` / `name`)."""
        return cls(Path(cfg.output_root) / cfg.name)

    def stage(self, stage: str) -> Path:
        return self.root / stage

    # ---- tile
    @property
    def tile(self) -> Path:
        return self.root / TILE

    @property
    def manifest(self) -> Path:
        return self.tile / "manifest.csv"

    @property
    def tile_summary(self) -> Path:
        return self.tile / "summary.json"

    def scene_rows(self, scene_id: str) -> Path:
        """The scene's manifest rows (`scenes/<id>.csv`)."""
        return self.tile / "scenes" / f"{scene_id}.csv"

    def scene_record(self, scene_id: str) -> Path:
        """The scene's metadata and freshness record (`scenes/<id>.json`), written last."""
        return self.tile / "scenes" / f"{scene_id}.json"

    def patch_dir(self, scene_id: str) -> Path:
        return self.tile / "patches" / scene_id

    # ---- features
    @property
    def features(self) -> Path:
        return self.root / FEATURES

    @property
    def features_meta(self) -> Path:
        return self.features / "meta.json"

    @property
    def features_stats(self) -> Path:
        return self.features / "stats.npz"

    # ---- train-classifier
    @property
    def classifier(self) -> Path:
        return self.root / TRAIN_CLASSIFIER

    @property
    def classifier_checkpoint(self) -> Path:
        return self.classifier / "best.pt"

    @property
    def classifier_metrics(self) -> Path:
        return self.classifier / "metrics.json"

    # ---- train-segmenter
    @property
    def segmenter(self) -> Path:
        return self.root / TRAIN_SEGMENTER

    @property
    def last_checkpoint(self) -> Path:
        return self.segmenter / "last.pt"

    @property
    def best_checkpoint(self) -> Path:
        return self.segmenter / "best.pt"

    # ---- predict
    @property
    def predict(self) -> Path:
        return self.root / PREDICT

    @property
    def calibration(self) -> Path:
        return self.predict / "calibration.json"

    @property
    def predict_summary(self) -> Path:
        """The record of the merged layers of the run's split (`contracts.predict_records.PredictSummary`)."""
        return self.predict / "summary.json"

    @property
    def footprints_geojson(self) -> Path:
        """Every scene's footprints of the run's split, merged (RFC 7946)."""
        return self.predict / "footprints.geojson"

    @property
    def footprints_gpkg(self) -> Path:
        """The merged footprints as a GeoPackage, beside the GeoJSON."""
        return self.footprints_geojson.with_suffix(".gpkg")

    @property
    def calibration_scenes(self) -> Path:
        """The probability rasters of the validation scenes the calibration scored."""
        return self.predict / "val"

    @property
    def input_footprints(self) -> Path:
        """The merged GeoJSON of `predict --input` without `--output` (its scenes in `footprints_scenes/`)."""
        return self.predict / "input" / "footprints.geojson"

    # ---- damage (a `damage:` section): train-damage/best.pt, damage/ the graded footprints and their scores
    @property
    def train_damage(self) -> Path:
        return self.root / TRAIN_DAMAGE

    @property
    def damage_checkpoint(self) -> Path:
        return self.train_damage / "best.pt"

    @property
    def damage_features(self) -> Path:
        """Per-building pooled hypercolumns of the training scenes, one file per scene (`<scene>.npz`)."""
        return self.train_damage / "features"

    @property
    def damage(self) -> Path:
        return self.root / DAMAGE

    @property
    def damage_scenes(self) -> Path:
        """Each test scene's graded footprints (`<scene>.geojson`, `.gpkg`), its record and truth vectors."""
        return self.damage / "scenes"

    @property
    def damage_geojson(self) -> Path:
        """The test split's footprints (predict's) with their grade: `damage` and `p_<grade>` properties."""
        return self.damage / "footprints.geojson"

    @property
    def damage_gpkg(self) -> Path:
        return self.damage / "footprints.gpkg"

    @property
    def damage_metrics(self) -> Path:
        return self.damage / "metrics.json"

    # ---- evaluate
    @property
    def evaluate(self) -> Path:
        return self.root / EVALUATE

    @property
    def metrics(self) -> Path:
        return self.evaluate / "metrics.json"

    @property
    def matches(self) -> Path:
        """Every predicted and true polygon of the evaluated scenes with its match status (EPSG:4326)."""
        return self.evaluate / "matches.geojson"

    # ---- others
    @property
    def cv(self) -> Path:
        return self.root / CV

    @property
    def report(self) -> Path:
        return self.root / REPORT / "index.html"


@dataclass(frozen=True)
class ScenePaths:
    """The per-scene files of the predict stage in one folder: the run's `predict/` (scene ids of
    `RESERVED_SCENE_IDS` excluded), or `<stem>_scenes/` beside the merged GeoJSON of `predict --input`."""

    folder: Path
    scene_id: str

    @property
    def prob(self) -> Path:
        return self.folder / f"{self.scene_id}_prob.tif"

    @property
    def geojson(self) -> Path:
        return self.folder / f"{self.scene_id}.geojson"

    @property
    def gpkg(self) -> Path:
        return self.folder / f"{self.scene_id}.gpkg"

    @property
    def record(self) -> Path:
        """The scene's freshness record (written last)."""
        return self.folder / f"{self.scene_id}.json"


# ---------------------------------------------------------------------------------------------------
# scene ids and output paths a user gives

# the run's own files in `<run>/predict/` (footprints.geojson/.gpkg, summary.json, calibration.json): a scene
# of that name would write over them (compared without case: macOS and Windows file systems ignore it)
RESERVED_SCENE_IDS = frozenset({"footprints", "summary", "calibration"})


def reserved_scene_id(scene_id: str) -> str | None:
    """Why `scene_id` cannot have its files in a run's `predict/` folder (None when it can)."""
    if scene_id.casefold() in RESERVED_SCENE_IDS:
        return (f"scene id {scene_id!r} is a name of the predict stage's own files ({scene_id.casefold()}.*); "
                "rename the image (scene skipped)")
    return None


def check_output_text(path: str | Path, what: str = "--output") -> Path:
    """`path` as a Path; a path with a control character (NUL, newline, tab, ...) is refused."""
    text = os.fspath(path)
    if not text:
        raise StageError(f"{what}: an empty path")
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise StageError(f"{what} {text!r}: a path with a control character (NUL, newline, ...) is refused")
    return Path(text)


def check_writable(folder: str | Path, what: str = "--output") -> None:
    """The folder `folder` exists and can be written, or can be made: its nearest existing ancestor is a
    writable folder on a writable file system. One line naming the folder otherwise."""
    p = Path(folder)
    while not p.exists() and not p.is_symlink():
        if p.parent == p:
            break
        p = p.parent
    if p.exists() and not p.is_dir():
        raise StageError(f"{printable(p)}: not a folder (cannot put the {what} files in it)")
    try:
        read_only = bool(os.statvfs(p).f_flag & os.ST_RDONLY)
    except OSError:
        read_only = False
    if read_only:
        raise StageError(f"read-only file system (cannot write {printable(p)})")
    if not os.access(p, os.W_OK | os.X_OK):
        raise StageError(f"permission denied (cannot write {printable(p)})")


def path_key(path: str | Path) -> str:
    """What identifies a path's file by name: absolute, links followed, case folded (macOS and Windows
    file systems ignore case, so two names that differ only by it are one file there)."""
    try:
        resolved = str(Path(path).resolve())
    except (OSError, RuntimeError):  # a symlink loop: the name itself identifies it
        resolved = os.path.abspath(path)
    return os.path.normcase(resolved).casefold()


def file_id(path: str | Path) -> tuple[int, int] | None:
    """(device, inode) of an existing file (hard links share it), else None."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return st.st_dev, st.st_ino


class FileSet:
    """Files to recognise, by name (`path_key`) and by inode: `find(path)` says which one a path is, if any,
    whatever link or case spelling reaches it. Each file is resolved once, so checking many paths against
    many files costs one lookup per path."""

    def __init__(self, files: Iterable[tuple[str | Path, Any]] = ()) -> None:
        self._by_key: dict[str, Any] = {}
        self._by_id: dict[tuple[int, int], Any] = {}
        for path, value in files:
            self.add(path, value)

    def add(self, path: str | Path, value: Any) -> None:
        self._by_key.setdefault(path_key(path), value)
        fid = file_id(path)
        if fid is not None:
            self._by_id.setdefault(fid, value)

    def find(self, path: str | Path) -> Any:
        hit = self._by_key.get(path_key(path))
        if hit is None:
            fid = file_id(path)
            hit = self._by_id.get(fid) if fid is not None else None
        return hit


def same_file(a: str | Path, b: str | Path) -> bool:
    """`a` and `b` are one file: the same `path_key`, or the same inode (a hard link)."""
    if path_key(a) == path_key(b):
        return True
    fa = file_id(a)
    return fa is not None and fa == file_id(b)


def inside(path: str | Path, folder: str | Path) -> bool:
    """`path` lies in `folder` or below it (links followed, case ignored)."""
    p, f = path_key(path), path_key(folder)
    return p == f or p.startswith(f.rstrip(os.sep) + os.sep)
