"""End to end: every stage, in order, on a tiny synthetic xView2 dataset, through the real CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pyogrio
import pytest

from footprints.cli import main
from footprints.scenes.grades import GRADES, PROBABILITY_KEYS
from footprints.synth.dataset import write_synthetic_dataset
from footprints.training.damage import BASELINES

pytestmark = pytest.mark.slow


def _tiny_config(tmp_path: Path, data: Path) -> Path:
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(
        f"""
name: tiny
output_root: {tmp_path / "outputs"}
seed: 3
data: {{root: {data}, format: xview2}}
tile: {{size: 64, stride: 64, split_ratios: [0.5, 0.25, 0.25]}}
backbone: {{weights: random, normalization: torchvision, layers: pool}}
features: {{per_class: 8, batch_size: 8}}
classifier: {{epochs: 2, batch_size: 64, hidden: 64, baseline: true}}
segmenter: {{epochs: 1, batch_size: 4}}
predict: {{overlap: 0.25, batch_size: 8, threshold_grid: [0.5], min_area_grid: [0.0]}}
evaluate: {{overlays: 1}}
damage: {{layers: [conv1_2, conv3_3], pixels_per_building: 16, hidden: 16, epochs: 3, block_size: 128}}
cluster: {{kind: local, workers: 0}}
"""
    )
    return cfg


def test_every_stage_runs_in_order_on_tiny_synthetic_scenes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    write_synthetic_dataset(data, n_scenes=4, seed=5, size=192, geotiff=False, damage=True)
    cfg = _tiny_config(tmp_path, data)

    assert main(["all", "--config", str(cfg)]) == 0
    out = tmp_path / "outputs" / "tiny"

    manifest = (out / "tile" / "manifest.csv").read_text().splitlines()
    assert len(manifest) - 1 == 4 * 9  # 192 px scenes, 64 px patches
    assert list((out / "features").glob("train_*.npz"))
    assert (out / "train-classifier" / "best.pt").is_file()
    assert (out / "train-segmenter" / "best.pt").is_file() and (out / "train-segmenter" / "last.pt").is_file()

    geojson = out / "predict" / "footprints.geojson"
    info = pyogrio.read_info(geojson)
    assert info["crs"] in ("EPSG:4326", "OGC:CRS84")

    metrics = json.loads((out / "evaluate" / "metrics.json").read_text())
    pixel = metrics["overall"]["pixel"]
    for key in ("building_iou", "f1", "precision", "recall", "mean_iu"):
        assert 0.0 <= pixel[key] <= 1.0, key
    assert "f1" in metrics["overall"]["polygon"] and "merges" in metrics["overall"]["polygon"]
    # every predicted footprint is in the matches layer with its status, and the HTML map was written
    matches = pyogrio.read_dataframe(out / "evaluate" / "matches.geojson")
    preds = matches[matches["kind"] == "pred"]
    assert len(preds) == pyogrio.read_info(geojson)["features"] == metrics["overall"]["polygon"]["n_pred"]
    assert (preds["status"] == "TP").sum() == metrics["overall"]["polygon"]["tp"]
    assert (matches["status"] == "FN").sum() == metrics["overall"]["polygon"]["fn"]
    assert (out / "report" / "index.html").stat().st_size > 100_000
    # damage: every test footprint graded, in the damage stage's layers, scored on the graded truth
    assert (out / "train-damage" / "best.pt").is_file()
    graded = pyogrio.read_dataframe(out / "damage" / "footprints.geojson")
    assert len(graded) == len(preds) and graded["damage"].dropna().isin(GRADES).all()
    assert set(PROBABILITY_KEYS.values()) <= set(graded.columns)
    damage = metrics["damage"]
    assert sum(damage["counts"].values()) == graded["damage"].notna().sum()
    assert damage["per_building"] is not None and 0 <= damage["xview2"]["score"] <= 1
    # beside the model, the baselines on the same truth buildings (fitted on its training buildings)
    assert set(damage["baselines"]) == set(BASELINES)
    assert all(sum(map(sum, b["confusion"])) == sum(map(sum, damage["per_building"]["confusion"]))
               for b in damage["baselines"].values())
    report = (out / "evaluate" / "report.md").read_text()
    assert "## Damage" in report and "| colour_forest |" in report
    # the run ends by telling the user where the footprints are
    printed = capsys.readouterr()
    assert str(geojson) in printed.out + printed.err

    # a second run finds every stage complete and skips the work: not one output is written again (the
    # run's own bookkeeping beside the stage folders, its lock and what-each-stage-wrote records, is)
    def outputs() -> dict:
        return {p: p.stat().st_mtime_ns for p in out.rglob("*")
                if p.is_file() and not p.relative_to(out).parts[0].startswith(".")}

    before = outputs()
    assert {".footprints.runtime.lock", ".tile.files.json"} <= {p.name for p in out.iterdir()}
    assert main(["all", "--config", str(cfg)]) == 0
    after = outputs()
    assert after == before, sorted(str(p.relative_to(out)) for p in after if after[p] != before.get(p))
