"""Feature shards read in bounded pieces (`features_store.SplitReader`) and the streaming classifier."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from footprints.benchmarks.scale import write_synthetic_features
from footprints.config import load_config
from footprints.contracts import features_store
from footprints.contracts.features_store import SplitReader, load_features
from footprints.contracts.paths import RunPaths
from footprints.errors import InputError
from footprints.runner import run_stage

LAYERS = ["input", "conv1_1"]  # 67 channels: small shards, same format as the stage's


@pytest.fixture()
def features(tmp_path):
    feature_dir = tmp_path / "features"
    meta = write_synthetic_features(feature_dir, 5000, seed=3, layers=LAYERS, shard_samples=600)
    return feature_dir, meta


def test_pieces_are_the_rows_the_shards_hold(features):
    feature_dir, meta = features
    reader = SplitReader(feature_dir, "train", chunk_rows=250)
    whole = load_features(feature_dir, "train")
    assert reader.n == len(whole["y"]) == meta["n"]["train"] and reader.channels == 67
    assert max(stop - start for _, start, stop in reader.chunks()) == 250
    pieces = [reader.read(chunk) for chunk in reader.chunks()]
    for key in ("X", "y", "w"):
        assert np.array_equal(np.concatenate([p[key] for p in pieces]), whole[key]), key
    assert pieces[0]["X"].dtype == np.float32 and pieces[0]["y"].dtype == np.int64


def test_shuffle_buffer_holds_at_most_its_size_and_passes_every_sample_once(features):
    feature_dir, _ = features
    reader = SplitReader(feature_dir, "train", chunk_rows=250)
    whole = load_features(feature_dir, "train")

    def one_pass(seed: int, rows: int = 700) -> tuple[list[int], np.ndarray]:
        sizes, firsts = [], []
        for fill in reader.buffers(np.random.default_rng(seed), rows):
            sizes.append(len(fill["X"]))
            assert len(fill["y"]) == len(fill["w"]) == len(fill["X"])
            firsts.append(fill["X"][:, 0].copy())  # a fill is valid until the next one
        return sizes, np.concatenate(firsts)

    sizes, seen = one_pass(0)
    assert max(sizes) == 700 and sum(sizes) == reader.n
    # every sample exactly once (the first channel is continuous noise: its values identify the samples)
    assert np.array_equal(np.sort(seen), np.sort(whole["X"][:, 0]))
    # shuffled across shards, not read in file order
    assert not np.array_equal(seen, whole["X"][:, 0])
    assert np.array_equal(one_pass(0)[1], seen)  # the same seed, the same order
    assert not np.array_equal(one_pass(1)[1], seen)
    # a split that fits in one fill comes in file order (its caller shuffles the whole of it)
    sizes, seen = one_pass(0, rows=reader.n)
    assert sizes == [reader.n] and np.array_equal(seen, whole["X"][:, 0])


def test_a_truncated_shard_is_named(features):
    feature_dir, meta = features
    shard = feature_dir / meta["shards"]["train"][1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=f"{shard.name}: unreadable feature shard"):
        reader = SplitReader(feature_dir, "train")
        for chunk in reader.chunks():
            reader.read(chunk)


def _cfg(tmp_path, *sets: str):
    return load_config(None, [
        f"output_root={tmp_path / 'out'}", "name=stream", "tile.target=binary", f"backbone.layers={LAYERS}",
        "classifier.hidden=16", "classifier.epochs=2", "classifier.batch_size=128", "classifier.lr=0.003",
        "classifier.device=cpu", "classifier.shuffle_buffer=500", *sets,
    ])


def test_classifier_streams_through_its_buffer_and_the_same_seed_gives_the_same_model(tmp_path, monkeypatch):
    from footprints.stages import train_classifier

    cfg = _cfg(tmp_path)
    write_synthetic_features(RunPaths.of(cfg).features, 5000, seed=3, layers=LAYERS, shard_samples=600)
    fills: list[int] = []
    real_buffers = features_store.SplitReader.buffers

    def watched(self, rng, rows):
        for fill in real_buffers(self, rng, rows):
            fills.append(len(fill["X"]))
            yield fill

    monkeypatch.setattr(features_store.SplitReader, "buffers", watched)
    monkeypatch.setattr(train_classifier, "BASELINE_MAX_SAMPLES", 1000)
    metrics = run_stage("train-classifier", cfg)
    assert max(fills) == 500 and sum(fills) == 2 * metrics["samples"]["train"]  # two epochs through the buffer
    assert metrics["mlp"]["val"]["building_iou"] > 0.9  # the classes are 1 standard deviation apart on 64 channels
    assert metrics["baseline"]["train_samples"] == 1000 and metrics["baseline"]["val"]["building_iou"] > 0.9
    first = torch.load(RunPaths.of(cfg).classifier_checkpoint, weights_only=True)["model"]
    run_stage("train-classifier", cfg, overwrite=True)
    again = torch.load(RunPaths.of(cfg).classifier_checkpoint, weights_only=True)["model"]
    assert all(torch.equal(first[k], again[k]) for k in first)


def test_scale_benchmark_summary_takes_the_worst_stage():
    from footprints.benchmarks.scale import SIZES, _subsets, _summarise

    assert all(sum(_subsets(n).values()) == n and _subsets(n)["hold"] >= 1 for n in SIZES)

    def fig(seconds: float, rss: float, n: int) -> dict:
        return {"seconds": seconds, "seconds_per_scene": seconds / n, "peak_rss_mb": rss}

    a, b, c = (str(n) for n in SIZES)
    out = _summarise({
        "tile": {a: fig(8, 200, SIZES[0]), b: fig(20, 210, SIZES[1]), c: fig(68, 220, SIZES[2])},
        "predict": {a: fig(8, 500, SIZES[0]), b: fig(32, 600, SIZES[1]), c: fig(256, 750, SIZES[2])},
        "report": {a: fig(1, 100, SIZES[0])},  # a stage that did not reach every size is left out
    })
    assert out["rss_growth"] == 1.5 and out["rss_growth_by_stage"] == {"tile": 1.1, "predict": 1.5}
    assert out["time_per_scene_growth"] == 2.0  # predict: 4 s per scene at the largest size, 2 at the smallest
    assert out["marginal_seconds_per_scene"]["tile"] == [1.0, 1.0]
