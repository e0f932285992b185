"""Stage names and the files every stage writes: `<output_root>/<name>/<stage>/...`.

The names are the ones a user types (`footprints train-segmenter`), so the folder of a stage is its name.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

TILE = "tile"
FEATURES = "features"
TRAIN_CLASSIFIER = "train-classifier"
TRAIN_SEGMENTER = "train-segmenter"
PREDICT = "predict"
EVALUATE = "evaluate"
STAGES = (TILE, FEATURES, TRAIN_CLASSIFIER, TRAIN_SEGMENTER, PREDICT, EVALUATE)
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
    """The per-scene files of the predict stage in one folder (the run's predict/ or beside --output)."""

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
