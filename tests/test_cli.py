"""The `footprints` command line: subcommands, help, real boolean flags, one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from footprints.cli import build_parser, main
from footprints.contracts.paths import STAGES

REPO = Path(__file__).resolve().parents[1]
ALL_COMMANDS = ["synth", *STAGES, "report", "all", "cv", "bench"]


def test_every_subcommand_has_help_and_common_options(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ALL_COMMANDS:
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        out = capsys.readouterr().out
        assert "--config" in out and "--set" in out, command


def test_flags_are_real_booleans() -> None:
    parser = build_parser()
    args = parser.parse_args(["train-segmenter", "--load_saved_model", "--overwrite"])
    assert args.load_saved_model is True and args.overwrite is True
    args = parser.parse_args(["train-segmenter"])
    assert args.load_saved_model is False and args.overwrite is False
    # a value after a boolean flag is not swallowed as "True"/"False"
    with pytest.raises(SystemExit):
        parser.parse_args(["train-segmenter", "--load_saved_model", "False"])


def test_set_is_repeatable() -> None:
    args = build_parser().parse_args(["tile", "--set", "tile.size=128", "--set", "tile.stride=64"])
    assert args.overrides == ["tile.size=128", "tile.stride=64"]


def test_config_error_is_one_line_without_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("tile:\n  size: huge\n")
    proc = subprocess.run(
        [sys.executable, "-m", "footprints.cli", "tile", "--config", str(bad)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "tile.size" in lines[0] and str(bad) in lines[0]
    assert "Traceback" not in proc.stderr


def test_bench_rejects_unknown_names(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["bench", "nonsense"])
    assert "invalid choice" in capsys.readouterr().err


def test_run_sh_forwards_commands_to_the_cli(tmp_path: Path) -> None:
    """`bash run.sh CMD ARGS` runs `footprints CMD ARGS` in the environment (here: this interpreter)."""
    env = {"FOOTPRINTS_PYTHON": sys.executable, "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    proc = subprocess.run(
        ["bash", str(REPO / "run.sh"), "tile", "--help"], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "--overwrite" in proc.stdout and "--config" in proc.stdout


def test_bench_predict_reports_its_three_rates_from_one_run(capsys: pytest.CaptureFixture[str]) -> None:
    """A small `bench predict` (512 px scene, the network on 256 px of it): the last line is JSON with the
    three rates, each the better of two passes, and the ratio made of them (no speed is asserted)."""
    import json

    assert main(["bench", "predict", "--set", "predict.bench_scene_px=512", "--set",
                 "predict.bench_model_px=256"]) == 0  # fmt: skip
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["bench"] == "predict" and result["scene_px"] == [512, 512] and result["model_px"] == [256, 256]
    assert len(result["io_seconds"]) == 2 and len(result["model_only_seconds"]) == 2
    assert result["km2_per_hour"] > 0 and result["model_only_km2_per_hour"] > 0 and result["io_polygons"] > 0
    ratio = result["io_km2_per_hour"] / result["model_only_km2_per_hour"]
    assert result["io_over_model_only"] == pytest.approx(ratio, abs=0.06)
