"""`python -m common.export ...`: the command line of `common.export.runner.body`."""
from __future__ import annotations

from common import cli
from common.export.runner import body

cli.main(body)
