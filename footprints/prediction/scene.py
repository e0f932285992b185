"""Predicting one scene: the worker's settings, its model, the probability raster and the polygons made from it.

Shared by the predict stage (`footprints.stages.predict`), its calibration (`footprints.prediction.calibration`)
and `footprints bench predict`, so that the benchmark times the stage's own code path:

- `PredictSettings`: what a worker needs, small and picklable (the model is loaded in the worker,
  `model_for`, once per process);
- `predict_probability`: the scene's probability COG with those settings (`footprints.polygons.inference`),
  optionally vectorising alongside its writing;
- `ensure_probability`: the same, reused when the scene's record says it was made with the same parameters;
- `open_for_model`: a scene on the grid the model reads it at: resampled to the model's training GSD when
  its own lies outside the training scenes' range (`predict.match_model_gsd`, `footprints.contracts.model_gsd`);
- `Vectoriser`: polygons from a probability raster with a scene record's vector settings, timed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import DataConfig, TileConfig
from ..contracts.freshness import digest, is_fresh
from ..contracts.model_gsd import GSD_TOLERANCE, match_gsd
from ..contracts.paths import ScenePaths
from ..contracts.predict_records import (
    PredictSceneRecord,
    VectorSettings,
    read_predict_scene_record,
    write_predict_scene_record,
)
from ..errors import FootprintsError, InputError, as_input_error, disk_full
from ..model.device import resolve_device
from ..polygons.inference import Model, predict_scene
from ..polygons.vectorize import polygons_from_probability
from ..scenes.sources import SceneSource, scene_config
from ..scenes.targets import SCHEMES, ClassScheme, scheme_for

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PredictSettings:
    """What a worker needs to predict one scene: small and picklable (the model is loaded in the worker)."""

    checkpoint: str
    fingerprint: str  # identity of the checkpoint: a retrained model invalidates old probabilities
    data: DataConfig
    tile: TileConfig  # size = the model's tile size, target_gsd = the checkpoint's tile.target_gsd
    overlap: float = 0.25
    batch_size: int = 8
    block_size: int = 2048
    tta_flips: bool = False
    prob_dtype: str = "uint8"
    device: str = "auto"
    hole_area_m2: float = 4.0
    simplify_px: float = 1.0
    classes: tuple[str, ...] = SCHEMES["binary"].classes  # the model's (its checkpoint meta)
    watershed: bool = True  # split touching buildings (predict.instances)
    regularize: bool = True
    # (median, min, max) GSD of the model's training scenes, when scenes outside that range are read at the
    # median (`open_for_model`); None: every scene at `tile.target_gsd` (or its own GSD)
    model_gsd: tuple[float, float, float] | None = None
    # the same record, known whether or not it is matched: what a scene's GSD is warned against
    training_gsd: tuple[float, float, float] | None = None
    # the checkpoint holds an out-of-domain reference (`footprints.prediction.domain`): each scene is scored;
    # neither this nor the warning threshold changes a probability raster (not in `prob_params`)
    domain: bool = False
    domain_warn: float | None = None
    amp: bool = True  # bf16/fp16 autocast on CUDA (`predict.amp`); ignored on CPU
    compile: bool = False  # torch.compile the segmenter once per process (`predict.compile`)

    @property
    def scheme(self) -> ClassScheme:
        return scheme_for(self.classes)

    def prob_params(self) -> dict[str, Any]:
        """What a probability raster depends on; a change redoes it even without --overwrite."""
        d = self.data
        return json.loads(json.dumps({
            "checkpoint": self.fingerprint, "classes": list(self.classes), "tile_size": self.tile.size,
            "target_gsd": self.tile.target_gsd,
            "overlap": self.overlap, "tta_flips": self.tta_flips, "prob_dtype": self.prob_dtype,
            "bands": list(d.bands), "stretch_percentiles": list(d.stretch_percentiles), "nodata": d.nodata,
            "geotransforms": d.geotransforms,
            # scenes outside the training GSDs are read at their median: a checkpoint without the record, or
            # predict.match_model_gsd false, keeps the key of before
            **({"match_model_gsd": list(self.model_gsd)} if self.model_gsd is not None else {}),
            # full precision on CUDA is another raster; the default (autocast) keeps the key of before
            **({"amp": False} if not self.amp else {}),
        }))  # fmt: skip

    @property
    def prob_key(self) -> str:
        return digest(self.prob_params())


# one model (and its meta) per worker process, loaded on first use (map_scenes ships only the checkpoint path)
_MODELS: dict[tuple[str, str, bool], tuple[Any, dict[str, Any]]] = {}


def _loaded(settings: PredictSettings) -> tuple[Any, dict[str, Any]]:
    key = (settings.checkpoint, settings.device, settings.compile)
    if key not in _MODELS:
        from ..model.segmenter import load_segmenter

        _MODELS.clear()
        device = resolve_device(settings.device)
        model, meta = load_segmenter(settings.checkpoint, device)
        if settings.compile:
            from ..model.segmenter import compile_segmenter

            model = compile_segmenter(model, (settings.tile.size, settings.tile.size), device)
        _MODELS[key] = (model, meta)
    return _MODELS[key]


def model_for(settings: PredictSettings) -> Model:
    """The segmenter of `settings.checkpoint` on its device, loaded once per process."""
    return _loaded(settings)[0]


def meta_for(settings: PredictSettings) -> dict[str, Any]:
    """The checkpoint meta of `model_for`'s segmenter (its out-of-domain reference among it)."""
    return _loaded(settings)[1]


@contextmanager
def open_for_model(source: SceneSource, settings: PredictSettings) -> Iterator[tuple[Any, PredictSettings]]:
    """The scene opened on the grid the model reads it at, and the settings of that scene: their
    `tile.target_gsd` is the GSD it was resampled to (so its probability raster's key and record say so).

    With `settings.model_gsd` (and no `tile.target_gsd`, which resamples every scene as before), a scene
    whose own GSD lies outside the training scenes' range is opened again at their median (its probability
    raster's summary records both GSDs, and the main process says so in one line, `gsd_note`: a dask
    worker's INFO lines reach no terminal); a scene too much coarser to enlarge is refused with the option
    that predicts it as it is. A scene far from the model's GSD gets the reader's warning (`gsd_warning`)."""
    from ..scenes.reader import gsd_warning, open_scene

    data = scene_config(source, settings.data)  # its data source's settings (data.sources), when several
    reader = open_scene(source, data, settings.tile)
    try:
        native = reader.native_gsd_m
        target = None
        if settings.model_gsd is not None and not settings.tile.target_gsd:
            target = match_gsd(native, settings.model_gsd)
        if target is not None:
            reader.close()
            settings = dataclasses.replace(settings, tile=dataclasses.replace(settings.tile, target_gsd=target))
            try:
                reader = open_scene(source, data, settings.tile)
            except InputError as err:  # enlarged too much (footprints.scenes.grid.MAX_UPSAMPLE)
                raise InputError(err.path, f"{err.reason}; predict.match_model_gsd=false predicts it at its own "
                                 "GSD") from None
        reference = settings.tile.target_gsd
        if not reference and settings.training_gsd is not None and native is not None:
            _, lo, hi = settings.training_gsd
            reference = min(max(native, lo), hi)  # the nearest GSD the model was trained at
        note = gsd_warning(reader, reference)
        if note:
            log.warning("%s", note)
        yield reader, settings
    finally:
        reader.close()


def gsd_note(scene_id: str, prob: dict[str, Any], settings: PredictSettings) -> str | None:
    """The line that says a scene was read at the model's GSD (`open_for_model`), from its probability
    raster's summary `prob`; None when it was read as the run reads every scene."""
    target, native = prob.get("target_gsd_m"), prob.get("native_gsd_m")
    if settings.model_gsd is None or settings.tile.target_gsd or not target:
        return None
    _, lo, hi = settings.model_gsd
    trained = f"{lo:.3g} m" if lo == hi else f"{lo:.3g}-{hi:.3g} m"
    own = f"{native:.3g} m" if native else "unknown"
    return (f"{scene_id}: ground sample distance {own}, outside the model's training scenes' {trained} "
            f"(+-{100 * GSD_TOLERANCE:.0f}%): read at {target:.3g} m (predict.match_model_gsd=false reads it as it is)")


def predict_probability(reader: Any, model: Model, path: Path, settings: PredictSettings,
                        alongside: Callable[[Path], Any] | None = None, *, amp: bool | None = None,
                        progress: bool = True) -> dict[str, Any]:
    """The probability COG of `reader`'s scene at `path` with the settings' windows, batches, blocks, flips,
    storage, device and classes (`footprints.polygons.inference.predict_scene`; `alongside` runs on the finished
    probabilities while the COG is written); `amp` None: the settings'."""
    return predict_scene(
        reader, model, path, tile_size=settings.tile.size, overlap=settings.overlap,
        batch_size=settings.batch_size, block_size=settings.block_size, tta_flips=settings.tta_flips,
        prob_dtype=settings.prob_dtype, device=resolve_device(settings.device), scheme=settings.scheme,
        amp=settings.amp if amp is None else amp,
        progress=progress, alongside=alongside,
    )  # fmt: skip


def ensure_probability(
    reader: Any, settings: PredictSettings, folder: Path, overwrite: bool,
    alongside: Callable[[Path], Any] | None = None,
) -> tuple[Path, dict[str, Any], bool, Any]:
    """The scene's probability COG, reused when its record says it was made with the same parameters;
    (path, summary, reused, what `alongside` returned when a new COG was made with it, else None).

    Leaves the scene's record covering the probability only: polygons written after it are then marked
    by the caller's new record, never by an old one.
    """
    sp = ScenePaths(folder, reader.scene_id)
    prob_key = settings.prob_key
    record = read_predict_scene_record(sp.record)
    if not overwrite and record is not None and is_fresh(sp.record, prob_key, "prob_key", [sp.prob.name]):
        summary = record.prob
        write_predict_scene_record(sp.record, PredictSceneRecord(reader.scene_id, prob_key, summary), [sp.prob])
        return sp.prob, summary, True, None
    sp.record.unlink(missing_ok=True)
    if reader.crs is None:
        log.warning("%s: no georeference: probabilities and polygons are in pixel coordinates", reader.scene_id)
    summary = predict_probability(reader, model_for(settings), sp.prob, settings, alongside)
    beside = summary.pop("alongside", None)
    if settings.tile.target_gsd:  # the GSD the scene was read at: evaluate reads its truth on the same grid
        summary["target_gsd_m"] = float(settings.tile.target_gsd)
        summary["native_gsd_m"] = reader.native_gsd_m
    write_predict_scene_record(sp.record, PredictSceneRecord(reader.scene_id, prob_key, summary), [sp.prob])
    return sp.prob, summary, False, beside


class Vectoriser:
    """Polygons from a probability raster (`footprints.polygons.vectorize`) with the vector settings of a scene record;
    `seconds` is what the last call took (predict records it, the benchmark reports it)."""

    def __init__(self, vector: VectorSettings, block_size: int, scene_id: str, pixel_size_m: float | None):
        self.vector, self.block_size, self.scene_id, self.pixel_size_m = vector, block_size, scene_id, pixel_size_m
        self.seconds = 0.0

    def __call__(self, prob: Path) -> Any:
        v = self.vector
        t = time.perf_counter()
        polys = polygons_from_probability(
            prob, threshold=v.threshold, min_area_m2=0.0 if v.min_area_m2 is None else v.min_area_m2,
            hole_area_m2=v.hole_area_m2, simplify_px=v.simplify_px, block_size=self.block_size,
            scene=self.scene_id, pixel_size_m=self.pixel_size_m, seed_threshold=v.seed_threshold,
        )  # fmt: skip
        self.seconds = time.perf_counter() - t
        return polys


def log_scene_error(source: SceneSource, err: BaseException, out_dir: Path | None = None) -> None:
    """One line for a scene that failed on a worker (a full disk under `out_dir` said as such)."""
    if not isinstance(err, FootprintsError) and out_dir is not None and disk_full(out_dir):
        err = InputError(out_dir, "no space left on device")
    log.error("%s", err if isinstance(err, FootprintsError) else as_input_error(err, source.image))
