"""The `footprints` command: one subcommand per stage, plus `synth`, `all` and `bench`.

Every subcommand takes `--config FILE` and repeatable `--set section.key=value`. Errors in inputs or
configuration print one line (`footprints: error: <file>: <reason>`) and exit 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from .benchmarks import BENCHMARKS
from .config import ConfigError, load_config
from .contracts.paths import STAGES
from .errors import FootprintsError, Preempted, describe_failure, printable
from .runner import run_all, run_cv, run_stage

log = logging.getLogger("footprints")

_STAGE_HELP = {
    "tile": "cut scenes into georeferenced patches with masks, a manifest and a scene-level split",
    "features": "sample class-balanced pixels and extract their VGG16 zoom-out hypercolumns",
    "train-classifier": "train the shallow class-weighted MLP (and a logistic-regression baseline)",
    "train-segmenter": "convert the MLP to 1x1 convolutions and train densely on whole patches",
    "predict": "whole-scene inference into probability GeoTIFFs and footprint polygons (GeoJSON, GPKG)",
    "train-damage": "train the damage classifier on the training scenes' graded buildings (a damage: section)",
    "damage": "grade the test split's footprints with the damage model (or, with --pre/--post/--footprints, any "
              "footprints on any pre/post pair)",
    "evaluate": "pixel IoU/F1, polygon F1 at IoU 0.5 and the xView2 localisation F1 on the test split",
}


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="YAML configuration (default: built-in defaults)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config key (repeatable), e.g. --set segmenter.epochs=3",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def _init_from(p: argparse.ArgumentParser) -> None:
    p.add_argument("--init_from", "--init-from", dest="init_from", metavar="CHECKPOINT",
                   help="fine-tune: start the classifier from this model (a train-classifier best.pt or a "
                   "train-segmenter best.pt/last.pt) instead of random weights; sets classifier.init_from")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="footprints",
        description="Building footprints from satellite images: tile -> features -> train-classifier -> "
        "train-segmenter -> predict -> evaluate. Outputs go to <output_root>/<name>/<stage>/.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("synth", help="generate synthetic xView2-layout scenes with their graded post-disaster pairs (and a GeoTIFF variant)")
    _common(p)
    p.add_argument("--out", required=True, help="output folder (gets images/, labels/ and geotiff/)")
    p.add_argument("--scenes", type=int, default=None, help="number of scenes (default 8)")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same scenes")
    p.add_argument("--size", type=int, default=1024, help="scene width and height in pixels (default 1024)")
    p.add_argument("--no-geotiff", dest="geotiff", action="store_false", help="skip the GeoTIFF+GeoJSON variant")

    def subset_counts(text: str) -> dict[str, int]:
        out: dict[str, int] = {}
        for item in text.split(","):
            name, _, count = item.strip().partition("=")
            safe = all(c.isascii() and (c.isalnum() or c in "-_") for c in name) and name != "geotiff"
            if not name or not safe or name in out or not count.strip().isdigit():
                raise argparse.ArgumentTypeError(f"expected SUBSET=COUNT,... (e.g. train=4,tier3=2,hold=2,"
                                                 f"test=2; folder names of letters, digits, - and _), got {text!r}")
            out[name] = int(count)
        return out

    p.add_argument("--no-damage", dest="damage", action="store_false",
                   help="leave out the post-disaster scenes (by default every scene has its graded post-disaster "
                   "pair: <id>_post_disaster.png with damage grades in its label)")
    p.add_argument("--subsets", type=subset_counts, metavar="SUBSET=N,...",
                   help="the official xView2 layout <out>/<subset>/{images,labels} with N scenes per subset "
                   "(ids unique across subsets), e.g. train=4,tier3=2,hold=2,test=2; instead of --scenes")

    for stage in STAGES:
        helptext = _STAGE_HELP[stage]
        p = sub.add_parser(stage, help=helptext, description=helptext)
        _common(p)
        p.add_argument("--overwrite", action="store_true", help="redo work whose outputs already exist")
        if stage == "train-classifier":
            _init_from(p)
        if stage == "train-segmenter":
            p.add_argument(
                "--load_saved_model",
                "--load-saved-model",
                dest="load_saved_model",
                action="store_true",
                help="resume from outputs/<name>/train-segmenter/last.pt (starts fresh, saying so, if none)",
            )
        if stage == "predict":
            p.add_argument("--checkpoint", help="segmenter checkpoint (default: the run's best.pt)")
            p.add_argument(
                "--input",
                dest="inputs",
                nargs="+",
                metavar="FILE_OR_DIR",
                help="scenes to predict (GeoTIFF, or xView2 PNG with labels/ beside images/) instead of the test split",
            )
            p.add_argument("--output", help="GeoJSON path for the merged footprints of --input scenes")
        if stage == "damage":
            p.add_argument("--checkpoint", help="damage checkpoint (default: the run's train-damage/best.pt)")
            p.add_argument("--pre", help="pre-disaster scene (GeoTIFF, or an xView2 PNG) to grade footprints on")
            p.add_argument("--post", help="its post-disaster scene (any CRS: resampled onto the pre scene's grid)")
            p.add_argument("--footprints", help="footprints to grade (GeoJSON, GeoPackage; any CRS), e.g. "
                           "OpenStreetMap buildings")
            p.add_argument("--output", help="GeoJSON path for the graded footprints (a GeoPackage beside it)")

    p = sub.add_parser("report", help="write a self-contained offline HTML map report of the run (or of "
                       "predict --input outputs)")
    _common(p)
    p.add_argument("--output", help="HTML path (default outputs/<name>/report/index.html, or <GEOJSON stem>_report.html)")
    p.add_argument("--predictions", metavar="GEOJSON", help="report on `predict --input ... --output GEOJSON` outputs")
    p.add_argument("--input", dest="inputs", nargs="+", metavar="FILE_OR_DIR", help="with --predictions: the scene images")

    p = sub.add_parser("all", help="run every stage in order on one config")
    _common(p)
    p.add_argument("--overwrite", action="store_true", help="redo every stage")
    p.add_argument("--load_saved_model", "--load-saved-model", dest="load_saved_model", action="store_true",
                   help="resume segmenter training from last.pt")
    _init_from(p)

    p = sub.add_parser("cv", help="cross-validation over scenes: every stage once per fold (tile.folds), "
                       "test metrics pooled over all scenes")
    _common(p)
    p.add_argument("--overwrite", action="store_true", help="redo every stage of every fold")
    _init_from(p)

    p = sub.add_parser("bench", help="run one benchmark; the last output line is a JSON object")
    _common(p)
    p.add_argument("name", choices=list(BENCHMARKS), help="which benchmark")
    p.add_argument("--classifier-gb", dest="classifier_gb", type=float, metavar="G",
                   help="scale: instead of the stage sizes, train-classifier on G GB of synthetic feature shards")
    p.add_argument("--scene-px", dest="scene_px", type=int, metavar="N",
                   help="predict: the synthetic scene's side in pixels (default 8192)")
    p.add_argument("--model-px", dest="model_px", type=int, metavar="N",
                   help="predict: the side of the top-left square the network runs on (default 0: all of it)")
    return parser


DEBUG_LOG = Path("logs") / "footprints-debug.log"


def _setup_logging(verbose: bool) -> Path | None:
    """Progress at INFO on the terminal; with `-v`, everything (DEBUG, and the traceback of every failure)
    also goes to `logs/footprints-debug.log`, so the terminal stays free of tracebacks. Returns that path."""
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "footprints", False)]:  # main() run again (tests)
        root.removeHandler(old)
        old.close()
    console = logging.StreamHandler(sys.stderr)
    console.footprints = True  # type: ignore[attr-defined]
    console.setFormatter(_ConsoleFormatter(fmt._fmt, datefmt="%H:%M:%S"))
    console.setLevel(logging.INFO)
    root.addHandler(console)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    debug_log = None
    if verbose:
        try:
            DEBUG_LOG.parent.mkdir(parents=True, exist_ok=True)
            handler = logging.FileHandler(DEBUG_LOG)
            handler.footprints = True  # type: ignore[attr-defined]
            handler.setFormatter(fmt)
            handler.setLevel(logging.DEBUG)
            root.addHandler(handler)
            debug_log = DEBUG_LOG
        except OSError as err:
            log.warning("cannot write the debug log %s (%s)", DEBUG_LOG, err.strerror or err)
    for noisy in ("rasterio", "fiona", "pyogrio", "distributed", "matplotlib", "PIL", "urllib3", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return debug_log


class _ConsoleFormatter(logging.Formatter):
    """The terminal's format: the message without its traceback (that goes to the debug log with -v)."""

    def format(self, record: logging.LogRecord) -> str:
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info = record.exc_text = record.stack_info = None
        try:
            return super().format(record)
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved


def _dispatch(args: argparse.Namespace, stage_options: dict[str, Any]) -> dict[str, Any] | None:
    if args.command == "synth":
        from .synth.dataset import write_synthetic_dataset

        if args.subsets is not None and args.scenes is not None:
            raise ConfigError("synth: give --scenes or --subsets, not both (--subsets sets the scene count)")
        n_scenes = (sum(args.subsets.values()) if args.subsets is not None
                    else args.scenes if args.scenes is not None else 8)
        return write_synthetic_dataset(args.out, n_scenes=n_scenes, seed=args.seed, size=args.size,
                                       geotiff=args.geotiff, subsets=args.subsets, damage=args.damage)
    overrides = list(args.overrides)
    if getattr(args, "init_from", None) is not None:
        # after the --set overrides, so the flag wins; JSON-quoted, so the path is read as the string it is
        overrides.append(f"classifier.init_from={json.dumps(args.init_from)}")
    cfg = load_config(args.config, overrides)
    if args.command == "all":
        return run_all(cfg, overwrite=args.overwrite, load_saved_model=args.load_saved_model)
    if args.command == "cv":
        return run_cv(cfg, overwrite=args.overwrite)
    if args.command == "report":
        from .report import run_report

        return run_report(cfg, output=args.output, predictions=args.predictions, inputs=args.inputs)
    if args.command == "bench":
        from .benchmarks import run_benchmark

        # only the options given: each belongs to one benchmark, which has its own defaults
        options = {k: v for k in ("classifier_gb", "scene_px", "model_px") if (v := getattr(args, k)) is not None}
        result = run_benchmark(args.name, cfg, **options)
        print(json.dumps(result), flush=True)  # the last line: one JSON object for scripts
        return None
    opts: dict[str, Any] = {"overwrite": args.overwrite}
    if args.command == "train-segmenter":
        opts["load_saved_model"] = args.load_saved_model
    if args.command == "predict":
        opts.update(checkpoint=args.checkpoint, inputs=args.inputs, output=args.output)
    if args.command == "damage" and any(getattr(args, k) for k in ("pre", "post", "footprints", "output")):
        from .stages.damage import grade_files

        return grade_files(cfg, checkpoint=args.checkpoint, pre=args.pre, post=args.post,
                           footprints=args.footprints, output=args.output)
    if args.command == "damage":
        opts["checkpoint"] = args.checkpoint
    return run_stage(args.command, cfg, **opts, **stage_options)


def main(argv: list[str] | None = None, **stage_options: Any) -> int:
    """The command line; `stage_options` are passed to the stage run (e.g. `hooks=` of train-segmenter)."""
    args = build_parser().parse_args(argv)
    debug_log = _setup_logging(args.verbose)
    try:
        _dispatch(args, stage_options)
    except Preempted as err:
        log.warning("%s", err)
        return Preempted.exit_code
    except (FootprintsError, ConfigError) as err:
        print(f"footprints: error: {printable(err)}", file=sys.stderr)
        return 2
    except OSError as err:  # a folder that cannot be written, a full disk
        log.debug("I/O failure", exc_info=True)
        print(f"footprints: error: {printable(describe_failure(err))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("footprints: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # a bug: one line here, the traceback in the debug log
        log.debug("unexpected failure", exc_info=True)
        where = f"traceback in {debug_log}" if debug_log else "run with -v for the traceback in " + str(DEBUG_LOG)
        print(f"footprints: error: internal error {type(err).__name__}: {printable(err)[:500]} ({where})",
              file=sys.stderr)
        return 1
    return 0


def exit_process(code: int) -> None:
    """End the command with `code`. A rank of a data-parallel job ends without the interpreter's
    finalization, where the destructors of torch's process-group objects can block on ranks that have
    already exited; its outputs are closed and on disk by then, the logs are flushed here."""
    if "torch.distributed" in sys.modules and _one_of_several_ranks():
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def _one_of_several_ranks() -> bool:
    from .training.distributed import dist_from_env

    return dist_from_env().enabled


def entry() -> None:
    """The installed `footprints` script."""
    from .runtime.heap import bound_heap_growth

    bound_heap_growth()
    exit_process(main())


if __name__ == "__main__":
    entry()
