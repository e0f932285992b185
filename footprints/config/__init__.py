"""Typed, validated configuration: one small dataclass per stage, loaded from YAML.

Every key has a type and a default; an unknown key or a value of the wrong type is a one-line
`ConfigError` naming the file and the dotted key. Relative paths are resolved against the current
working directory (run.sh runs from the repository root, SLURM jobs from the submit directory).

The dataclasses are `schema`; building them from a mapping (types, unknown-key hints) is `build`; value
ranges and cross-key rules are `checks`; safe YAML reading and `load_config` are `yaml_source`.
"""

from __future__ import annotations

from .build import config_from_dict
from .checks import INT64_MAX, NAME_MAX, OPEN, RANGES, SEED_MAX
from .schema import (
    CONFIG_VERSION,
    GRID_KEYS,
    BackboneConfig,
    ClassifierConfig,
    ClusterConfig,
    Config,
    ConfigError,
    DamageConfig,
    DataConfig,
    EvaluateConfig,
    FeaturesConfig,
    PredictConfig,
    SegmenterConfig,
    SlurmClusterConfig,
    TileConfig,
)
from .yaml_source import MAX_CONFIG_BYTES, MAX_YAML_DEPTH, MAX_YAML_NODES, load_config

__all__ = [
    "CONFIG_VERSION", "GRID_KEYS", "INT64_MAX", "MAX_CONFIG_BYTES", "MAX_YAML_DEPTH", "MAX_YAML_NODES",
    "NAME_MAX", "OPEN", "RANGES", "SEED_MAX",
    "BackboneConfig", "ClassifierConfig", "ClusterConfig", "Config", "ConfigError", "DamageConfig", "DataConfig",
    "EvaluateConfig", "FeaturesConfig", "PredictConfig", "SegmenterConfig", "SlurmClusterConfig", "TileConfig",
    "config_from_dict", "load_config",
]
