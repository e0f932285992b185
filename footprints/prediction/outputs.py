"""Where predict's outputs may go: every path the stage will write, checked before anything is read or written.

Never an input image, label or mask, never a file of the run (checkpoint, calibrations, summary), never an
existing file footprints did not write, always a folder that can be written; each problem is one line
naming the files (`check_outputs`). Scene ids that differ only by case get distinct names first
(`distinct_ids`), so that no two scenes share a file on a case-insensitive file system.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from ..atomic import is_temporary
from ..contracts.footprint_ownership import is_footprints_file
from ..contracts.paths import FileSet, ScenePaths, check_writable, path_key, reserved_scene_id
from ..contracts.predict_records import read_predict_scene_record
from ..errors import InputError, StageError, printable
from ..scenes.sources import SceneSource

log = logging.getLogger(__name__)


def distinct_ids(sources: Sequence[SceneSource]) -> list[SceneSource]:
    """`sources` with scene ids that differ without regard to case: on a case-insensitive file system (macOS,
    Windows) `A.tif` and `a.tif` would write one `a.geojson`; the later ones get `<id>_2`, ... (a warning)."""
    taken = {s.scene_id.casefold() for s in sources}
    seen: set[str] = set()
    out = []
    for src in sources:
        sid = src.scene_id
        if sid.casefold() in seen:
            k = 2
            while f"{sid}_{k}".casefold() in taken:
                k += 1
            new = f"{sid}_{k}"
            log.warning("%s: scene id %r differs from another only by case; its outputs are named %s (a "
                        "case-insensitive file system would make them one)", src.image, sid, new)
            src = dataclasses.replace(src, name=new)
            taken.add(new.casefold())
        seen.add(src.scene_id.casefold())
        out.append(src)
    return out


def scene_files(folder: Path, scene_id: str) -> tuple[Path, ...]:
    """Every file predict writes for one scene in `folder`."""
    sp = ScenePaths(folder, scene_id)
    return sp.prob, sp.geojson, sp.gpkg, sp.record


def holds_predictions(folder: Path) -> bool:
    """An existing scenes folder is predict's: empty (temporaries aside), or holding a scene record or a
    probability raster."""
    entries = [p for p in folder.iterdir() if not is_temporary(p)]
    if not entries:
        return True
    for p in entries:
        if p.name.endswith("_prob.tif"):
            return True
        if p.suffix == ".json":
            record = read_predict_scene_record(p)
            if record is not None and record.scene_id == p.stem:
                return True
    return False


def check_outputs(
    sources: Sequence[SceneSource], merged: dict[str, Path | None], scene_dir: Path, run_files: dict[str, Path],
    in_run: bool, given: Path | None = None,
) -> tuple[list[SceneSource], int, bool]:
    """Check every path the stage will write before anything is read or written.

    `merged`: what -> path (the merged GeoJSON, GeoPackage, the HTML report or None); `run_files`: what ->
    path of the files of the run that no output may replace (checkpoint, calibrations, summary). A problem
    of the run (an output onto an input, a label, a run file, a foreign file, a folder that cannot be
    written) is a `StageError` naming both files; a scene whose own files would meet the run's is left
    out with one line. Each path is resolved once (thousands of scenes cost thousands of lookups).
    `given`: the --output path, named in the messages about the files beside it.
    Returns (the scenes to predict, how many were left out, whether to write the report).
    """
    inputs = FileSet((f, (src, Path(f))) for src in sources for f in src.files())
    runs = FileSet((f, (name, f)) for name, f in run_files.items())
    written = {what: path for what, path in merged.items() if path is not None}
    write_report = "report" in written
    same_folder = [p for p in written.values() if path_key(p.parent) == path_key(scene_dir)]
    for what, path in written.items():
        if path.is_dir():
            raise StageError(f"{printable(path)}: a folder; --output must name a .geojson file (the GeoPackage, the "
                             "report and the scenes folder go beside it)")
        # the file the user named, and the output beside it when that is the one in the way
        where = (f"{printable(given)}: the {what}" if path == given or given is None
                 else f"{printable(given)}: the {what} beside it ({printable(path)})")
        hit = inputs.find(path)
        if hit is not None:
            src, f = hit
            kind = "image" if f == src.image else "labels" if f == src.label else "mask"
            raise StageError(f"{where} would overwrite {printable(f)}, the {kind} of scene {src.scene_id} (an input); "
                             "choose another --output")
        hit = runs.find(path)
        if hit is not None:
            name, f = hit
            raise StageError(f"{where} would overwrite {printable(f)}, the {name}; choose another --output")
        if what == "report":
            if path.exists() or path.is_symlink():
                from ..report.html import is_footprints_report

                if not is_footprints_report(path):
                    log.warning("predict: %s exists and is not a footprints report: no HTML report written (it "
                                "is left as it is)", printable(path))
                    write_report = False
        elif (path.exists() or path.is_symlink()) and not is_footprints_file(path):
            raise StageError(f"{printable(path)}: exists and is not a footprints layer; it is left as it is (choose "
                             "another --output, or move it away)")
    if scene_dir.exists() and not scene_dir.is_dir():
        raise StageError(f"{printable(scene_dir)}: exists and is not a folder (the per-scene outputs go there); choose "
                         "another --output, or move it away")
    folder = path_key(scene_dir).rstrip(os.sep) + os.sep
    for src in sources:
        for f in src.files():
            if path_key(f).startswith(folder):
                raise StageError(f"{printable(scene_dir)}: the per-scene output folder holds the input {printable(f)}; "
                                 "choose another --output (or move the inputs out of it)")
    if not in_run and scene_dir.is_dir() and not holds_predictions(scene_dir):
        raise StageError(f"{printable(scene_dir)}: exists and holds files predict did not write (the per-scene "
                         "outputs go there); choose another --output, or move it away")
    for path in written.values():
        check_writable(path.parent)
    check_writable(scene_dir)  # itself when it exists (a read-only folder of an earlier run), else its parent
    # a scene's own files never replace the run's: the merged layers (an --output into the scenes folder
    # that names a scene's file is refused; the default names are reserved ids) and the run's files
    merged_names = {p.name.casefold(): p for p in same_folder}
    blocked = {p.name.casefold(): p for p in run_files.values() if path_key(p.parent) == path_key(scene_dir)}
    keep, refused = [], 0
    for src in sources:
        reason = reserved_scene_id(src.scene_id) if in_run else None
        own = scene_files(scene_dir, src.scene_id)
        if reason is None:
            taken = next((merged_names[f.name.casefold()] for f in own if f.name.casefold() in merged_names), None)
            if taken is not None:
                raise StageError(f"{printable(taken)}: --output would overwrite scene {src.scene_id}'s own output; "
                                 "choose another --output")
            hit = next(((f, blocked[f.name.casefold()]) for f in own if f.name.casefold() in blocked), None)
            if hit is not None:
                reason = (f"scene id {src.scene_id!r} would write {hit[0].name} over {printable(hit[1])}, a file of the "
                          "run itself; rename the image (scene skipped)")
        if reason is not None:
            log.error("%s", InputError(src.image, reason))
            refused += 1
        else:
            keep.append(src)
    return keep, refused, write_report
