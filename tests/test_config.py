"""Config loading: typed, validated, one-line errors naming the key and the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from footprints.config import Config, ConfigError, config_from_dict, load_config
from footprints.contracts.paths import RunPaths

REPO = Path(__file__).resolve().parents[1]
REQUIRED_KEYS = [
    "name",
    "data.root",
    "tile.size",
    "tile.stride",
    "features.per_class",
    "classifier.epochs",
    "segmenter.epochs",
    "segmenter.batch_size",
    "backbone.weights",
    "backbone.normalization",
    "cluster.kind",
]


def _get(cfg: Config, dotted: str):
    node = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


@pytest.mark.parametrize("name", ["demo", "xview2", "spacenet-rio"])
def test_shipped_configs_load_and_have_the_documented_keys(name: str) -> None:
    cfg = load_config(REPO / "configs" / f"{name}.yaml")
    assert cfg.name == name
    for key in REQUIRED_KEYS:
        _get(cfg, key)  # raises AttributeError if a documented key is missing
    assert RunPaths.of(cfg).stage("tile") == Path("outputs") / name / "tile"


def test_unknown_key_names_key_and_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\ntile:\n  sise: 256\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert "tile.sise" in msg and str(path) in msg and "\n" not in msg


@pytest.mark.parametrize(
    ("yaml_text", "key"),
    [
        ("tile:\n  size: big\n", "tile.size"),
        ("segmenter:\n  augment: 'no'\n", "segmenter.augment"),
        ("classifier:\n  lr: fast\n", "classifier.lr"),
        ("cluster:\n  kind: kubernetes\n", "cluster.kind"),
        ("tile:\n  split_ratios: 0.5\n", "tile.split_ratios"),
        ("segmenter:\n  epochs: 2.5\n", "segmenter.epochs"),
    ],
)
def test_wrong_type_names_key_and_file(tmp_path: Path, yaml_text: str, key: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert key in str(err.value) and str(path) in str(err.value)


def test_cross_field_checks(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("tile:\n  size: 64\n  stride: 128\n")
    with pytest.raises(ConfigError, match="tile.stride"):
        load_config(path)


@pytest.mark.parametrize("inputs", ["post+rubble", "diff+diff", "", "post,pre"])
def test_damage_inputs_are_known_parts_joined_by_plus(tmp_path: Path, inputs: str) -> None:
    path = tmp_path / "d.yaml"
    path.write_text(f"damage:\n  inputs: '{inputs}'\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert "damage.inputs" in message and "absdiff" in message and str(path) in message and "\n" not in message
    path.write_text("damage:\n  inputs: pre+absdiff\n")
    assert load_config(path).damage.inputs == "pre+absdiff"


@pytest.mark.parametrize(("section", "key"), [("inputs: post+stddiff", "damage.inputs"),
                                              ("inputs: post\n  context_m: 5", "damage.context_m"),
                                              ("inputs: post\n  train_pixels: 0", "damage.train_pixels")])
def test_a_per_pixel_damage_model_takes_what_a_pixel_has(tmp_path: Path, section: str, key: str) -> None:
    path = tmp_path / "d.yaml"
    path.write_text(f"damage:\n  classify: pixel\n  {section}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert key in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value)
    path.write_text("damage:\n  classify: voxel\n")
    with pytest.raises(ConfigError, match="damage.classify"):
        load_config(path)
    path.write_text("damage:\n  classify: pixel\n  inputs: post+absdiff\n")
    assert load_config(path).damage.classify == "pixel"


def test_invalid_yaml_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("tile: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(path)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.yaml")


def test_overrides_are_typed_and_validated() -> None:
    cfg = load_config(
        REPO / "configs" / "demo.yaml",
        ["segmenter.epochs=5", "predict.threshold=0.4", "segmenter.augment=false", "tile.target_gsd=null"],
    )
    assert cfg.segmenter.epochs == 5
    assert cfg.predict.threshold == pytest.approx(0.4)
    assert cfg.segmenter.augment is False
    assert cfg.tile.target_gsd is None
    with pytest.raises(ConfigError, match="segmenter.epochs"):
        load_config(REPO / "configs" / "demo.yaml", ["segmenter.epochs=many"])
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["segmenter.epochs"])


def test_ints_widen_to_float_and_round_trip_through_dict() -> None:
    cfg = load_config(None, ["classifier.lr=1", "name=run1"])
    assert isinstance(cfg.classifier.lr, float)
    again = config_from_dict(cfg.to_dict())
    assert again.to_dict() == cfg.to_dict()


def test_every_numeric_key_has_a_range() -> None:
    """`checks.RANGES` bounds every int/float key (and list of them); a new key without a range fails here."""
    import dataclasses
    import typing

    from footprints.config import RANGES

    def numeric(tp) -> bool:
        args = typing.get_args(tp)
        if typing.get_origin(tp) is list:
            return numeric(args[0])
        if type(None) in args:
            return any(numeric(a) for a in args if a is not type(None))
        return tp in (int, float)

    def keys(cls, prefix: str = ""):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.metadata.get("internal"):
                continue
            # a section that may be absent (damage: DamageConfig | None) is checked when present
            tp = hints[f.name]
            optional = type(None) in typing.get_args(tp)
            section = next((a for a in ((tp,) if not optional else typing.get_args(tp)) if dataclasses.is_dataclass(a)),
                           None)
            if section is not None:
                yield from keys(section, f"{prefix}{f.name}.")
            elif numeric(hints[f.name]):
                yield prefix + f.name

    assert set(keys(Config)) == set(RANGES)


def test_benchmark_sizes_are_not_config_keys() -> None:
    """`footprints bench predict` takes its scene sizes as options; a config that sets them is refused."""
    for key in ("predict.bench_scene_px", "predict.bench_model_px"):
        with pytest.raises(ConfigError, match=f"unknown key '{key}'"):
            load_config(None, [f"{key}=512"])
