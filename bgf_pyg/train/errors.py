"""The error that ends a run whose training diverged."""

from __future__ import annotations

from ..checks import InputError


class DivergenceError(InputError):
    """Training diverged: the loss or the network's outputs stopped being finite (usually a step
    size or logit scale too large for the model); the CLI adds the options that set them."""
