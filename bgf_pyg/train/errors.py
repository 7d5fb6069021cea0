"""The error that ends a run whose training diverged."""

from __future__ import annotations


class DivergenceError(ArithmeticError):
    """Training diverged: the loss or the network's outputs stopped being finite (usually a step
    size or logit scale too large for the model); the CLI adds the options that set them.

    An ``ArithmeticError``, as a numeric failure of the computation is (``FloatingPointError``,
    ``OverflowError``): neither a bad input (``InputError``, ``ValueError``) nor a
    ``RuntimeError``, which the command line reads as a bug. The command line reports it as a
    user error (one line, exit code 2: :data:`bgf_pyg.arguments.USER_ERRORS`)."""
