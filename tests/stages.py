"""Helpers for the tests that start the stage scripts as a user would (marked `stages`).

One home for what several test files need: the scripts' names, the environment they run in,
running one, reading its single `error:` line, and finding temporary files left behind.
(Plain functions in a module rather than fixtures in conftest.py: module-level helpers of the
test files call them, and pytest advises against importing conftest.)
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STAGES = {"s1": "stage1_profile_teacher.py", "s2": "stage2_distill.py", "s3": "stage3_evaluate.py"}
# One intra-op thread (conftest says why), unbuffered output for the tests that read a log while
# the child runs, and the checkout on the path for `python -m common.<x>`.
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
TIMEOUT_S = 300  # per child; a healthy tiny stage takes a few seconds


def run_stage(script: str, args: list[str], timeout: float = TIMEOUT_S, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run a stage script (a key of STAGES or any script/`-m` argument list head) to completion."""
    head = [STAGES.get(script, script)]
    return subprocess.run([sys.executable, *head, *args], cwd=ROOT, env=env or ENV, capture_output=True, text=True, timeout=timeout)


def one_error_line(out: subprocess.CompletedProcess) -> str:
    """The single `error:` line of a stage that stopped on a UserError (exit 2, no traceback)."""
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert out.returncode == 2 and len(errors) == 1 and "Traceback" not in out.stderr, out.stderr
    return errors[0]


def temp_files(root: Path) -> list[Path]:
    """Every `*.tmp` under root: what an atomic write leaves only if it was interrupted badly."""
    return sorted(Path(root).rglob("*.tmp"))


class Killed(KeyboardInterrupt):
    """What an interrupt leaves: no `failed` marker, the last epoch's checkpoint kept."""


def kill_at_evaluation(monkeypatch, n: int = 2) -> list[int]:
    """Make the training loop's `evaluate` raise Killed at its n-th call (epoch n's evaluation,
    after epoch n - 1's checkpoint is on disk) and pass every other call; returns the call count
    ([calls]), which the resume tests read and may reset."""
    import common.train.loop as train_loop  # here: this module is also used by torch-free tests

    real, calls = train_loop.evaluate, [0]

    def evaluate(*args, **kwargs):
        calls[0] += 1
        if calls[0] == n:
            raise Killed
        return real(*args, **kwargs)

    monkeypatch.setattr(train_loop, "evaluate", evaluate)
    return calls
