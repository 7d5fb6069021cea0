"""The package's log lines on the terminal: INFO and above on stderr, rank 0's only under
torchrun."""

from __future__ import annotations

import logging
import sys

from . import distributed

log = logging.getLogger("bgf_pyg")


class _StderrHandler(logging.Handler):
    """Writes to whatever ``sys.stderr`` is at the time (callers and tests may swap it)."""

    def emit(self, record: logging.LogRecord) -> None:
        print(self.format(record), file=sys.stderr)


def setup_logging() -> None:
    """Show the package's INFO lines (e.g. "resumed from ...") on stderr; under torchrun only rank
    0's (the others log warnings and errors)."""
    if not any(isinstance(h, _StderrHandler) for h in log.handlers):
        log.addHandler(_StderrHandler())
    log.setLevel(logging.INFO if distributed.launcher_rank() == 0 else logging.WARNING)
