"""The resume decision of train-segmenter (`footprints.training.resume.decide`), branch by branch.

Each row gives the facts (flags, what the output folder holds, the current inputs) and the outcome
written out in full: action, message, log level and whether the earlier outputs are cleared. The paths
are names only (nothing exists there): the function reads no file. The same rules end to end, with real
checkpoints: tests/test_training.py and tests/test_resume.py.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import pytest

from footprints.training.resume import Action, Decision, Facts, LastCheckpoint, decide, stale_because

OUT = Path("/nowhere/runs/demo/train-segmenter")
LAST = "/nowhere/runs/demo/train-segmenter/last.pt"
CLASSIFIER = Path("/nowhere/runs/demo/train-classifier/best.pt")
INFO, WARNING = logging.INFO, logging.WARNING

# the model the current config makes: classifier digest "aaaa", stride 2, frozen backbone
CURRENT = {"classifier_digest": "aaaa", "stride": 2, "train_backbone": False}


def facts(last: LastCheckpoint | None = None, **changes: Any) -> Facts:
    """Facts of a run of 2 epochs with stride 2, a frozen backbone and the classifier "aaaa"."""
    base = Facts(
        overwrite=False, load_saved_model=False, out_dir=OUT, last_path=OUT / "last.pt", last=last,
        has_best=last is not None, has_history=last is not None, epochs=2, stride=2, train_backbone=False,
        classifier_path=CLASSIFIER, classifier_digest="aaaa",
    )  # fmt: skip
    return dataclasses.replace(base, **changes)


def ckpt(epoch: int, step: int = 0, **meta: Any) -> LastCheckpoint:
    """last.pt after `epoch` completed epochs and `step` steps of the next, its model the current one
    unless `meta` says otherwise (a key given as None is left out: a checkpoint that predates it)."""
    recorded = {**CURRENT, **meta}
    return LastCheckpoint(epoch, step, {k: v for k, v in recorded.items() if v is not None})


NOTHING_TO_DO_2_OF_2 = (
    f"{LAST}: already trained 2 epoch(s) (segmenter.epochs = 2): nothing to do (--overwrite retrains; "
    "raise segmenter.epochs and pass --load_saved_model to go on)"
)
EARLIER_RESULTS = (
    "/nowhere/runs/demo/train-segmenter: holds the results of an earlier run (best.pt, history.json) but no "
    "last.pt to resume from; pass --overwrite to train again"
)

CASES = {
    # --overwrite: fresh and cleared whatever is there; --load_saved_model is ignored, and said so
    "overwrite with load_saved_model": (
        facts(ckpt(2), overwrite=True, load_saved_model=True),
        Decision(Action.FRESH, "--overwrite: starting fresh (--load_saved_model is ignored)", INFO, True),
    ),
    "overwrite alone": (facts(ckpt(1), overwrite=True), Decision(Action.FRESH, "", INFO, True)),
    "overwrite, last.pt not read": (facts(None, overwrite=True), Decision(Action.FRESH, "", INFO, True)),
    "overwrite over an earlier run's best.pt": (
        facts(None, overwrite=True, has_best=True, has_history=True), Decision(Action.FRESH, "", INFO, True),
    ),
    # nothing on disk
    "nothing on disk": (facts(None), Decision(Action.FRESH, "", INFO, False)),
    "load_saved_model with nothing on disk": (
        facts(None, load_saved_model=True),
        Decision(Action.FRESH, f"--load_saved_model: no checkpoint at {LAST}; starting fresh", WARNING, False),
    ),
    # a last.pt of another model: trained again, with a warning, outputs cleared
    "another classifier": (
        facts(ckpt(2, classifier_digest="bbbb")),
        Decision(Action.FRESH, f"{LAST}: converted from another classifier than "
                               "/nowhere/runs/demo/train-classifier/best.pt; training again from the current "
                               "classifier", WARNING, True),
    ),  # fmt: skip
    "another classifier, load_saved_model": (
        facts(ckpt(1, classifier_digest="bbbb"), load_saved_model=True),
        Decision(Action.FRESH, f"{LAST}: converted from another classifier than "
                               "/nowhere/runs/demo/train-classifier/best.pt; training again from the current "
                               "classifier (--load_saved_model cannot continue it)", WARNING, True),
    ),  # fmt: skip
    "another stride": (
        facts(ckpt(2), stride=1),
        Decision(Action.FRESH, f"{LAST}: trained with segmenter.stride = 2, the config says 1; training again "
                               "from the current classifier", WARNING, True),
    ),  # fmt: skip
    "another backbone training, mid-run": (
        facts(ckpt(0, 1), train_backbone=True),
        Decision(Action.FRESH, f"{LAST}: trained with segmenter.train_backbone = False, the config says True; "
                               "training again from the current classifier", WARNING, True),
    ),  # fmt: skip
    "another classifier and another stride: the classifier is named": (
        facts(ckpt(2, classifier_digest="bbbb"), stride=1),
        Decision(Action.FRESH, f"{LAST}: converted from another classifier than "
                               "/nowhere/runs/demo/train-classifier/best.pt; training again from the current "
                               "classifier", WARNING, True),
    ),  # fmt: skip
    # what is not a sign of another model
    "checkpoint from before classifier digests": (
        facts(ckpt(2, classifier_digest=None)), Decision(Action.DONE, NOTHING_TO_DO_2_OF_2, INFO, False),
    ),
    "no classifier file now": (
        facts(ckpt(2), classifier_digest=None), Decision(Action.DONE, NOTHING_TO_DO_2_OF_2, INFO, False),
    ),
    "checkpoint without stride or train_backbone": (
        facts(ckpt(2, stride=None, train_backbone=None), stride=4, train_backbone=True),
        Decision(Action.DONE, NOTHING_TO_DO_2_OF_2, INFO, False),
    ),
    # a finished run: left as it is
    "finished, no flags": (facts(ckpt(2)), Decision(Action.DONE, NOTHING_TO_DO_2_OF_2, INFO, False)),
    "finished, load_saved_model": (
        facts(ckpt(2), load_saved_model=True), Decision(Action.DONE, NOTHING_TO_DO_2_OF_2, INFO, False),
    ),
    "fewer epochs asked than trained": (
        facts(ckpt(3)),
        Decision(Action.DONE, f"{LAST}: already trained 3 epoch(s) (segmenter.epochs = 2): nothing to do "
                              "(--overwrite retrains; raise segmenter.epochs and pass --load_saved_model to go on)",
                 INFO, False),
    ),  # fmt: skip
    "the conversion only (epochs 0)": (
        facts(ckpt(0), epochs=0),
        Decision(Action.DONE, f"{LAST}: already trained 0 epoch(s) (segmenter.epochs = 0): nothing to do "
                              "(--overwrite retrains; raise segmenter.epochs and pass --load_saved_model to go on)",
                 INFO, False),
    ),  # fmt: skip
    # an unfinished run: resumed with --load_saved_model, refused without it
    "more epochs asked, no flags": (
        facts(ckpt(2), epochs=3),
        Decision(Action.REFUSE, f"{LAST}: holds a run trained for 2 of 3 epoch(s); pass --load_saved_model to "
                                "continue it or --overwrite to start again", INFO, False),
    ),  # fmt: skip
    "cut mid-epoch, no flags": (
        facts(ckpt(0, 1)),
        Decision(Action.REFUSE, f"{LAST}: holds a run trained for 0 of 2 epoch(s) and 1 step(s); pass "
                                "--load_saved_model to continue it or --overwrite to start again", INFO, False),
    ),  # fmt: skip
    "more epochs asked, load_saved_model": (
        facts(ckpt(2), epochs=3, load_saved_model=True), Decision(Action.RESUME, "", INFO, False),
    ),
    "cut mid-epoch, load_saved_model": (
        facts(ckpt(1, 2), load_saved_model=True), Decision(Action.RESUME, "", INFO, False),
    ),
    # an earlier run's results without last.pt: refused unless --overwrite
    "best.pt without last.pt": (facts(None, has_best=True), Decision(Action.REFUSE, EARLIER_RESULTS, INFO, False)),
    "history.json without last.pt, load_saved_model": (
        facts(None, has_history=True, load_saved_model=True), Decision(Action.REFUSE, EARLIER_RESULTS, INFO, False),
    ),
}


@pytest.mark.parametrize("given, expected", list(CASES.values()), ids=list(CASES))
def test_decision(given: Facts, expected: Decision) -> None:
    assert decide(given) == expected


def test_stale_because_needs_a_last_checkpoint() -> None:
    assert stale_because(facts(None, stride=1)) == ""
    assert stale_because(facts(ckpt(2))) == ""
    assert stale_because(facts(ckpt(2), stride=3)) == "trained with segmenter.stride = 2, the config says 3"


def test_every_action_is_reached() -> None:
    assert {decide(given).action for given, _ in CASES.values()} == set(Action)
