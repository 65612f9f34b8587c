"""`python -m common.study plan ...`: the command line of `common.study.runner.main`."""
from __future__ import annotations

from common import cli
from common.study.runner import main

cli.main(main)
