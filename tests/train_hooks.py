"""Training hooks for tests: a process that signals itself at an exact point of training.

`SignalAt("2:SIGKILL:step")` sends the signal once the global step count reaches 2, at the point named:
`step` (after the optimizer step, before its checkpoint), `checkpoint` (between writing a checkpoint's
temporary file and renaming it) or `validation` (at a validation batch).

Run as a script it is the `footprints` command with that hook injected into train-segmenter:
`python tests/train_hooks.py SPEC train-segmenter --config ...` (SPEC "-" for no hook).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from footprints.training.trainer import TrainingHooks  # noqa: E402


class SignalAt(TrainingHooks):
    def __init__(self, spec: str):
        parts = spec.split(":")
        self.step = int(parts[0])
        self.sig = getattr(signal, parts[1] if parts[1].startswith("SIG") else "SIG" + parts[1])
        self.where = parts[2] if len(parts) > 2 else "step"
        self.fired = False

    def _maybe(self, where: str, global_step: int) -> None:
        if not self.fired and where == self.where and global_step >= self.step:
            self.fired = True
            os.kill(os.getpid(), self.sig)

    def after_step(self, global_step: int) -> None:
        self._maybe("step", global_step)

    def at_validation(self, global_step: int) -> None:
        self._maybe("validation", global_step)

    def before_checkpoint_rename(self, global_step: int) -> None:
        self._maybe("checkpoint", global_step)


if __name__ == "__main__":
    from footprints.cli import main

    spec, argv = sys.argv[1], sys.argv[2:]
    sys.exit(main(argv, **({"hooks": SignalAt(spec)} if spec != "-" else {})))
