"""What train-segmenter does with what it finds: start fresh, resume, leave a finished run, or refuse.

`decide` is a pure function of plain facts (the flags, what the output folder holds, the inputs the config
names now): no file is read and nothing is logged here. The trainer gathers the facts, logs or raises the
decision's message and acts on it; `tests/test_resume_decision.py` covers every branch.

The rules:

- `--overwrite` starts fresh and clears the earlier outputs (`--load_saved_model` is then ignored).
- A last.pt whose model is not the one the config makes (converted from another classifier, another head
  stride or backbone training) is stale like any stage output whose inputs changed: it is trained again
  from the current classifier, with a warning; resuming it would mix two models.
- A last.pt that trained all the epochs asked for is done: nothing to do.
- A last.pt that did not is resumed with `--load_saved_model`, and refused without it (the message says
  which flag to pass), so that a rerun never silently throws training away.
- best.pt or history.json without a last.pt are an earlier run's results that cannot be resumed: refused
  without `--overwrite`, which would replace them.
- Nothing on disk: fresh (with a warning when `--load_saved_model` asked for a checkpoint).
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class Action(enum.Enum):
    FRESH = "fresh"  # build the model from the classifier and train from epoch 0
    RESUME = "resume"  # load last.pt and continue where it stopped
    DONE = "done"  # last.pt trained every epoch asked for: leave the results as they are
    REFUSE = "refuse"  # the stage stops with the decision's message (a StageError)


@dataclass(frozen=True)
class LastCheckpoint:
    """What last.pt records, as far as the decision needs it."""

    epoch: int  # completed epochs
    step: int  # completed steps of the epoch in progress
    meta: Mapping[str, Any]  # the model's meta; `classifier_digest`, `stride`, `train_backbone` when recorded


@dataclass(frozen=True)
class Facts:
    """The flags, the output folder's contents and the current inputs."""

    overwrite: bool
    load_saved_model: bool
    out_dir: Path  # <run>/train-segmenter (named in messages only)
    last_path: Path  # its last.pt (named in messages only)
    last: LastCheckpoint | None  # last.pt's record; None when there is none (or it was not read: --overwrite)
    has_best: bool  # best.pt exists
    has_history: bool  # history.json exists
    epochs: int  # segmenter.epochs
    stride: int  # segmenter.stride
    train_backbone: bool  # segmenter.train_backbone
    classifier_path: Path  # the classifier checkpoint the config names (named in messages only)
    classifier_digest: str | None  # its file digest; None when there is no such file


@dataclass(frozen=True)
class Decision:
    action: Action
    message: str = ""  # to log at `level` ("" for nothing); for REFUSE, the error to raise
    level: int = logging.INFO
    clear_outputs: bool = False  # delete the earlier run's outputs before training


def stale_because(facts: Facts) -> str:
    """Why last.pt's model is not the one this config makes ("" when it is, or there is no last.pt): another
    classifier (its file digest, recorded at the conversion; checkpoints from before it are taken as they
    are), or another head stride or backbone training."""
    if facts.last is None:
        return ""
    meta = facts.last.meta
    recorded = meta.get("classifier_digest")
    if recorded is not None and facts.classifier_digest is not None and recorded != facts.classifier_digest:
        return f"converted from another classifier than {facts.classifier_path}"
    for key, now in (("stride", facts.stride), ("train_backbone", facts.train_backbone)):
        if key in meta and meta[key] != now:
            return f"trained with segmenter.{key} = {meta[key]}, the config says {now}"
    return ""


def decide(facts: Facts) -> Decision:
    """The action the facts call for, with the message to log (or raise) and whether to clear outputs."""
    if facts.overwrite:
        note = "--overwrite: starting fresh (--load_saved_model is ignored)" if facts.load_saved_model else ""
        return Decision(Action.FRESH, note, logging.INFO, clear_outputs=True)
    last, where = facts.last, facts.last_path
    stale = stale_because(facts)
    if stale:
        cannot = " (--load_saved_model cannot continue it)" if facts.load_saved_model else ""
        message = f"{where}: {stale}; training again from the current classifier{cannot}"
        return Decision(Action.FRESH, message, logging.WARNING, clear_outputs=True)
    if last is not None and last.epoch >= facts.epochs:
        return Decision(Action.DONE, (
            f"{where}: already trained {last.epoch} epoch(s) (segmenter.epochs = {facts.epochs}): nothing to "
            "do (--overwrite retrains; raise segmenter.epochs and pass --load_saved_model to go on)"
        ))  # fmt: skip
    if last is not None and not facts.load_saved_model:
        return Decision(Action.REFUSE, (
            f"{where}: holds a run trained for {last.epoch} of {facts.epochs} epoch(s)"
            + (f" and {last.step} step(s)" if last.step else "")
            + "; pass --load_saved_model to continue it or --overwrite to start again"
        ))  # fmt: skip
    if last is not None:
        return Decision(Action.RESUME)
    if facts.has_best or facts.has_history:
        # an earlier run's results without its last.pt: starting again would silently replace them
        return Decision(Action.REFUSE, (
            f"{facts.out_dir}: holds the results of an earlier run (best.pt, history.json) but no last.pt to "
            "resume from; pass --overwrite to train again"
        ))  # fmt: skip
    if facts.load_saved_model:
        return Decision(Action.FRESH, f"--load_saved_model: no checkpoint at {where}; starting fresh",
                        logging.WARNING)
    return Decision(Action.FRESH)
