"""``python tests/fault_injection.py POINT:STEP <lora-tsd arguments>``: the ``lora-tsd`` command with a loop callback
that SIGKILLs the process at ``POINT`` (``step``: before optimizer step STEP computes anything;
``checkpoint-write``: half-way through writing the checkpoint of step STEP; ``final-eval``: before the final test
evaluation, after the adapter is written, STEP being the run's last). The kill-and-resume tests run the
command through this script, so the production loop carries no test hook. ``-`` as POINT:STEP kills nowhere.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

from lora_tsd.app.cli import main
from lora_tsd.app.workflow.callbacks import LoopCallback, register_callback

SCRIPT = os.path.abspath(__file__)


class KillAt(LoopCallback):
    def __init__(self, point: str, step: int) -> None:
        self.point, self.step = point, step

    def _maybe_kill(self, point: str, step: int) -> None:
        if (point, step) == (self.point, self.step):
            os.kill(os.getpid(), signal.SIGKILL)

    def on_step_start(self, state: Any, step: int) -> None:
        self._maybe_kill("step", step)

    def on_checkpoint_partial(self, state: Any, step: int) -> None:
        self._maybe_kill("checkpoint-write", step)

    def on_final_test_evaluation(self, state: Any) -> None:
        self._maybe_kill("final-eval", state.cfg.steps)


def command(fault: str | None) -> list[str]:
    """The argv prefix that runs ``lora-tsd`` with the fault ``POINT:STEP`` (or none)."""
    return [sys.executable, SCRIPT, fault or "-"]


if __name__ == "__main__":
    spec = sys.argv[1]
    if spec != "-":
        point, step = spec.rsplit(":", 1)
        register_callback(KillAt(point, int(step)))
    sys.exit(main(sys.argv[2:]))
