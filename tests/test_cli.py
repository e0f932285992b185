"""The `footprints` command line: subcommands, help, real boolean flags, one-line errors."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from footprints import cli
from footprints.cli import main
from footprints.config import load_config
from footprints.contracts.paths import STAGES

REPO = Path(__file__).resolve().parents[1]
ALL_COMMANDS = ["synth", *STAGES, "report", "all", "cv", "bench"]


@pytest.fixture(autouse=True)
def _no_log_handler_left() -> Iterator[None]:
    """main() logs to this test's captured stderr: leave no handler of it behind for the next tests."""
    yield
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "footprints", False)]:
        root.removeHandler(handler)


@pytest.fixture
def stage_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, Any, dict[str, Any]]]:
    """What the command line hands each stage: (stage, config, options), the stage itself not run."""
    calls: list[tuple[str, Any, dict[str, Any]]] = []

    def record(stage: str, cfg: Any, **options: Any) -> dict[str, Any]:
        calls.append((stage, cfg, options))
        return {}

    monkeypatch.setattr(cli, "run_stage", record)
    return calls


def test_every_subcommand_has_help_and_common_options(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ALL_COMMANDS:
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        out = capsys.readouterr().out
        assert "--config" in out and "--set" in out, command


def test_flags_reach_the_stage_as_real_booleans(stage_calls: list, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train-segmenter", "--load_saved_model", "--overwrite"]) == 0
    assert main(["train-segmenter", "--load-saved-model"]) == 0
    assert main(["train-segmenter"]) == 0
    options = [opts for _, _, opts in stage_calls]
    assert options == [{"overwrite": True, "load_saved_model": True}, {"overwrite": False, "load_saved_model": True},
                       {"overwrite": False, "load_saved_model": False}]
    assert all(type(v) is bool for opts in options for v in opts.values())
    # a value after a boolean flag is not swallowed as "True"/"False": refused, and no stage runs
    with pytest.raises(SystemExit) as exit_info:
        main(["train-segmenter", "--load_saved_model", "False"])
    assert exit_info.value.code == 2 and "unrecognized arguments: False" in capsys.readouterr().err
    assert len(stage_calls) == 3


def test_every_repeated_set_reaches_the_config(stage_calls: list) -> None:
    default = load_config(None)
    assert (default.tile.size, default.tile.stride) != (128, 64)
    assert main(["tile", "--set", "tile.size=128", "--set", "tile.stride=64"]) == 0
    ((stage, cfg, _),) = stage_calls
    assert stage == "tile" and (cfg.tile.size, cfg.tile.stride) == (128, 64)


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


def test_bench_options_belong_to_their_benchmark(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "tile", "--scene-px", "512"]) == 2
    assert "bench tile: takes no option scene_px" in capsys.readouterr().err
    assert main(["bench", "predict", "--scene-px", "100"]) == 2  # refused before any scene is made
    assert "--scene-px must be in [256, 65536], got 100" in capsys.readouterr().err


def test_bench_predict_reports_its_three_rates_from_one_run(capsys: pytest.CaptureFixture[str]) -> None:
    """A small `bench predict` (512 px scene, the network on 256 px of it): the last line is JSON with the
    three rates, each the better of the two passes its log lines reported as they ran, and the ratio of those
    (no speed is asserted)."""
    import json

    assert main(["bench", "predict", "--scene-px", "512", "--model-px", "256"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out.strip().splitlines()[-1])
    assert result["bench"] == "predict" and result["scene_px"] == [512, 512] and result["model_px"] == [256, 256]
    assert len(result["io_seconds"]) == 2 and len(result["model_only_seconds"]) == 2
    assert result["km2_per_hour"] > 0 and result["model_only_km2_per_hour"] > 0 and result["io_polygons"] > 0
    logged_io = [float(v) for v in re.findall(r"null model [\d.]+ s \(([\d.]+) km2/h\)", captured.err)]
    logged_alone = [float(v) for v in re.findall(r"model alone (?:again )?[\d.]+ s.*?\(([\d.]+) km2/h\)", captured.err)]
    assert len(logged_io) == 2 and len(logged_alone) == 2, captured.err[-3000:]
    assert result["io_km2_per_hour"] == pytest.approx(max(logged_io), abs=0.6)  # logged as %.0f
    assert result["model_only_km2_per_hour"] == pytest.approx(max(logged_alone), abs=0.06)  # logged as %.1f
    ratio = max(logged_io) / max(logged_alone)
    assert result["io_over_model_only"] == pytest.approx(ratio, rel=0.05)
    # and the rates are the areas over the fastest of the seconds: 512 px and 256 px squares at 0.5 m
    km2 = (512 * 0.5) ** 2 / 1e6

    def consistent(rate: float, area: float, seconds: list[float]) -> bool:
        """`rate` is `area` over the fastest of `seconds`, which the JSON rounds to 0.01 s (a fast pass of
        0.05 s is 10% off after rounding: the bound follows the rounding, not a fixed share)."""
        fastest = min(seconds)
        return area * 3600 / (fastest + 0.005) * 0.99 <= rate <= area * 3600 / max(fastest - 0.005, 1e-6) * 1.01

    assert consistent(result["io_km2_per_hour"], km2, result["io_seconds"])
    assert consistent(result["model_only_km2_per_hour"], km2 / 4, result["model_only_seconds"])
