"""The predict stage's records: a scene's `<scene>.json` and the run's `predict/summary.json`, typed.

A scene record (`PredictSceneRecord`) is the freshness record (`footprints.contracts.freshness`) of one
predicted scene, beside its files: first written over the probability raster alone (`scene_id`,
`prob_key`, `prob`, with the key ""), then, once the polygons are written, over the raster and both
layers, with how they were made (`vector`) and what they hold, and the scene's `domain_score` when the
model could score it (an optional field: older records read with None). Predict, evaluate and the report
read it.

The run's summary (`PredictSummary`, `predict/summary.json`) is the record of the merged layers of a run's
split: which split was predicted, with which threshold and calibration; evaluate and predict's rerun read it.
`predict --input` returns the same fields without writing them.

Each has one writer and one reader. The JSON keys, their order and their values are those the stage wrote
when it built the dicts itself, so the records of runs made before read back unchanged and stay fresh; a
field an older record lacks reads as None.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .freshness import FILES, KEY, read_record, write_record


@dataclass(frozen=True)
class VectorSettings:
    """How a scene's polygons were made from its probability raster (the scene record's `vector`)."""

    threshold: float
    seed_threshold: float | None
    min_area_m2: float | None
    hole_area_m2: float
    simplify_px: float
    regularize: bool | None = None  # None: a record from before regularisation was an option

    def as_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, raw: Any) -> VectorSettings | None:
        """The settings of a record's `vector`; None when it is absent or lacks what the polygons need."""
        if not isinstance(raw, Mapping) or any(k not in raw for k in ("threshold", "hole_area_m2", "simplify_px")):
            return None
        return cls(threshold=raw["threshold"], seed_threshold=raw.get("seed_threshold"),
                   min_area_m2=raw.get("min_area_m2"), hole_area_m2=raw["hole_area_m2"],
                   simplify_px=raw["simplify_px"], regularize=raw.get("regularize"))


@dataclass(frozen=True)
class PredictSceneRecord:
    """One predicted scene. `vector` None: the record covers the probability raster only (no polygons yet).
    `key` and `files` are those of `footprints.contracts.freshness`; the writer sets `files`."""

    scene_id: str
    prob_key: str  # what the probability raster depends on (`PredictSettings.prob_key`)
    prob: dict[str, Any] = field(default_factory=dict)  # predict_scene's summary of the raster
    vector: VectorSettings | None = None
    polygons: int | float | None = None
    crs: str | None = None  # "": pixel space
    area_km2: float | None = None
    vector_seconds: float | None = None
    geojson: str | None = None
    gpkg: str | None = None
    prob_reused: bool | None = None
    key: str = ""
    files: dict[str, int] = field(default_factory=dict)
    # how unlike the model's training scenes the scene looks (`footprints.model.domain`: 0 = its mean pixel is
    # theirs); None: not scored (a checkpoint without the reference, or a record of before the check)
    domain_score: float | None = None

    @property
    def has_polygons(self) -> bool:
        return self.vector is not None

    def fields(self) -> dict[str, Any]:
        """The record's own fields in the order they are written (those of the polygons only once made)."""
        out: dict[str, Any] = {"scene_id": self.scene_id, "prob_key": self.prob_key, "prob": self.prob}
        if self.vector is not None:
            out.update(vector=self.vector.as_json(), polygons=self.polygons, crs=self.crs, area_km2=self.area_km2,
                       vector_seconds=self.vector_seconds, geojson=self.geojson, gpkg=self.gpkg,
                       prob_reused=self.prob_reused)
            if self.domain_score is not None:  # absent, not null: an unscored record is written as before
                out["domain_score"] = self.domain_score
        return out

    def as_json(self) -> dict[str, Any]:
        """The record as it is on disk."""
        return {**self.fields(), KEY: self.key, FILES: self.files}


def write_predict_scene_record(path: str | Path, record: PredictSceneRecord,
                               files: Iterable[str | Path]) -> PredictSceneRecord:
    """Write a scene's record (last, atomically); `files` are the paths it covers. Returns it as written."""
    written = write_record(path, record.key, files, **record.fields())
    return dataclasses.replace(record, files=dict(written[FILES]))


def read_predict_scene_record(path: str | Path) -> PredictSceneRecord | None:
    """The scene record at `path`; None when it is absent, unreadable or no scene record (no `scene_id`)."""
    raw = read_record(path)
    if raw is None or not isinstance(raw.get("scene_id"), str):
        return None
    n = raw.get("polygons")
    files = raw.get(FILES)
    score = raw.get("domain_score")
    return PredictSceneRecord(
        scene_id=raw["scene_id"], prob_key=str(raw.get("prob_key", "")), prob=raw.get("prob") or {},
        vector=VectorSettings.from_json(raw.get("vector")),
        polygons=n if isinstance(n, (int, float)) else None,
        crs=raw.get("crs"), area_km2=raw.get("area_km2"), vector_seconds=raw.get("vector_seconds"),
        geojson=raw.get("geojson"), gpkg=raw.get("gpkg"), prob_reused=raw.get("prob_reused"),
        key=str(raw.get(KEY, "")), files=files if isinstance(files, dict) else {},
        domain_score=float(score) if isinstance(score, (int, float)) and not isinstance(score, bool) else None,
    )  # fmt: skip


@dataclass(frozen=True)
class PredictSummary:
    """The merged layers of one predict run and how they were made. `split` is set for a run's split (the
    written record), None for `predict --input`; `key` and `files` are those of the written record."""

    geojson: str
    gpkg: str
    scenes: int
    failed: int
    skipped: int
    polygons: int
    threshold: float
    seed_threshold: float | None
    min_area_m2: float
    calibration: str | None  # "config", "default" or the calibration file used
    scene_dir: str
    seconds: float
    split: str | None = None
    key: str = ""
    files: dict[str, int] = field(default_factory=dict)

    def fields(self) -> dict[str, Any]:
        """The summary's own fields in the order they are written (`split` only for a run's split)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("split", KEY, FILES)}
        if self.split is not None:
            out["split"] = self.split
        return out

    def as_json(self) -> dict[str, Any]:
        """The record as it is on disk."""
        return {**self.fields(), KEY: self.key, FILES: self.files}


_SUMMARY_FIELDS = tuple(f.name for f in dataclasses.fields(PredictSummary) if f.name not in (KEY, FILES))


def write_predict_summary(path: str | Path, summary: PredictSummary, files: Iterable[str | Path]) -> PredictSummary:
    """Write the run's summary (last, atomically) over the merged layers `files`. Returns it as written."""
    written = write_record(path, summary.key, files, **summary.fields())
    return dataclasses.replace(summary, files=dict(written[FILES]))


def read_predict_summary(path: str | Path) -> PredictSummary | None:
    """The run's summary at `path`, or None when it is absent or unreadable (nothing was predicted)."""
    raw = read_record(path)
    if raw is None:
        return None
    files = raw.get(FILES)
    return PredictSummary(**{name: raw.get(name) for name in _SUMMARY_FIELDS},  # type: ignore[arg-type]
                          key=str(raw.get(KEY, "")), files=files if isinstance(files, dict) else {})
