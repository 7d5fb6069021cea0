"""Value domains: what a setting may be, declared once for every layer that checks it.

A domain parses text (call it: ``positive_int("3")``) and raises ``ValueError`` in one form,
``expected an integer >= 1, got '0'``; a :class:`Number` also checks a Python value for a named
parameter (``positive_int.check(k, "k")``: ``TypeError`` for the wrong type, ``ValueError`` such
as ``k must be >= 1, got 0``). The library raises only these; a command line shows the text
error after its option (:func:`bgf_pyg.arguments.argument_type`). NaN and ±inf are in no domain.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SEED_MAX = 2**32 - 1  # NumPy's seed range


@dataclass(frozen=True)
class Number:
    """The ``kind`` (``int`` or ``float``) values in an interval (``None``: unbounded;
    ``*_open``: the bound itself is excluded), finite."""

    kind: type
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def contains(self, value: float) -> bool:
        """Whether ``value`` lies in the domain (NaN and ±inf never do)."""
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if self.low is not None and (value < self.low or self.low_open and value == self.low):
            return False
        return not (self.high is not None
                    and (value > self.high or self.high_open and value == self.high))

    @property
    def bounds(self) -> str:
        """The interval in words: ``>= 1``, ``> 0``, ``in [0, 1]`` (empty when unbounded)."""
        low, high = (None if b is None else f"{b:g}" if self.kind is float else str(int(b))
                     for b in (self.low, self.high))
        if low is not None and high is not None:
            return (f"in {'(' if self.low_open else '['}{low}, "
                    f"{high}{')' if self.high_open else ']'}")
        if low is not None:
            return f"{'>' if self.low_open else '>='} {low}"
        if high is not None:
            return f"{'<' if self.high_open else '<='} {high}"
        return ""

    @property
    def expected(self) -> str:
        """The domain in words, e.g. ``an integer >= 1`` or ``a finite number in (0, 1]``."""
        what = "an integer" if self.kind is int else "a finite number"
        return f"{what} {self.bounds}".rstrip()

    def __call__(self, text: str) -> int | float:
        """``text`` read as a value of the domain; ``ValueError`` saying what was expected."""
        try:
            value = self.kind(text)
        except ValueError:
            raise ValueError(f"expected {self.expected}, got {text!r}") from None
        if not self.contains(value):
            raise ValueError(f"expected {self.expected}, got {text!r}")
        return value

    def check(self, value: object, name: str) -> int | float:
        """``value`` of parameter ``name`` as the domain's ``kind`` (an ``int`` is a float too;
        a ``bool`` is neither); ``TypeError`` or ``ValueError`` naming ``name`` otherwise."""
        types = int if self.kind is int else (int, float)
        if isinstance(value, bool) or not isinstance(value, types):
            expected = f"an int {self.bounds}".rstrip() if self.kind is int else "a float"
            raise TypeError(f"{name} must be {expected}, got {type(value).__name__} {value!r}")
        if not self.contains(value):
            raise ValueError(f"{name} must {self._range}, got {value}")
        return self.kind(value)

    @property
    def _range(self) -> str:
        """What :meth:`check` says of a value of the right type outside the domain: ``lie in
        [0, 1]``, ``be >= 1`` (an int's finiteness goes without saying), ``be a finite number
        > 0``."""
        if self.low is not None and self.high is not None:
            return f"lie {self.bounds}"
        return f"be {self.bounds if self.kind is int else self.expected}"


positive_int = Number(int, low=1)
non_negative_int = Number(int, low=0)
seed_int = Number(int, low=0, high=SEED_MAX)
positive_float = Number(float, low=0, low_open=True)
non_negative_float = Number(float, low=0)
probability = Number(float, low=0, high=1)
fraction = Number(float, low=0, high=1, low_open=True)
#: A dropout rate: 1 would drop everything.
dropout_rate = Number(float, low=0, high=1, high_open=True)


def val_classes(text: str) -> int | float:
    """``0`` (no validation split), a fraction in (0, 1) of the training classes, or an integer
    count (whether the training split has enough classes is checked once it is read:
    :func:`bgf_pyg.data.splits.val_class_count`)."""
    expected = f"expected 0, a fraction in (0, 1) or a class count >= 1, got {text!r}"
    try:
        return non_negative_int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        raise ValueError(expected) from None
    if not (math.isfinite(value) and 0 < value < 1):
        raise ValueError(expected)
    return value


def device(text: str) -> str:
    """A torch device that exists on this machine (``cpu``, ``cuda``, ``cuda:N``, ``mps``)."""
    try:
        dev = torch.device(text)
    except RuntimeError:
        raise ValueError(f"expected cpu, cuda or cuda:N, got {text!r}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{text!r}: CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"{text!r}: this machine has {torch.cuda.device_count()} CUDA "
                             "device(s)")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"{text!r}: MPS is not available on this machine")
    elif dev.type != "cpu":
        raise ValueError(f"expected cpu, cuda or cuda:N, got {text!r}")
    return text
