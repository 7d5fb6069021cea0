"""Input checks shared by every public entry point.

Each check raises ``ValueError``/``TypeError`` whose message names the argument and says what was
expected, so a user sees ``"x must be a 2-D tensor of shape (N, D), got shape (3,)"`` instead
of a shape error deep inside a matmul. A number's domain (``k >= 1``, a probability) is checked
by its :mod:`bgf_pyg.domains` entry: ``positive_int.check(k, "k")``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TypeVar

import torch
from torch import Tensor

from .domains import positive_int


class InputError(RuntimeError):
    """A file or setting the user supplied cannot be used (an unreadable image, a checkpoint that
    does not fit, a diverging loss). The CLI reports it in one line; a plain ``RuntimeError`` from
    torch is a bug and keeps its traceback."""


class NonFiniteError(ValueError):
    """A tensor holds NaN or inf. The training loop reads it as divergence and names the options
    that set the step size; elsewhere it is the ``ValueError`` of a bad argument."""


ErrorT = TypeVar("ErrorT", bound=BaseException)


def naming(err: ErrorT, *parameters: str) -> ErrorT:
    """``err``, marked as naming the library ``parameters`` in its message (by their Python names,
    as ``samples_per_class=1`` or ``samples_per_class``): a command line reports them by its own
    option names (:func:`named_parameters`)."""
    err.parameters = parameters  # type: ignore[attr-defined]
    return err


#: How a message writes a parameter or option: by its own name in the library (``lr_milestones``),
#: by the command line's flag in a command (``--lr-milestones``).
Name = Callable[[str], str]


def worded(err: ErrorT, wording: Callable[[Name], str]) -> ErrorT:
    """``err``, whose message is ``wording`` of the library's own names
    (``wording(lambda name: name)``), marked so that a front end can write it with its own
    option names (:func:`message_in`)."""
    err.wording = wording  # type: ignore[attr-defined]
    return err


def message_in(err: BaseException, name: Name) -> str:
    """``err``'s message with the names :func:`worded` marked written by ``name``; else its
    message."""
    wording = getattr(err, "wording", None)
    return str(err) if wording is None else wording(name)


def error_chain(err: BaseException | None) -> Iterator[BaseException]:
    """``err``, then each error in its chain of ``__cause__`` / ``__context__``, once each."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def named_parameters(err: BaseException) -> tuple[str, ...]:
    """The parameters :func:`naming` marked on ``err`` or on an error in its chain of causes."""
    found = [name for e in error_chain(err) for name in getattr(e, "parameters", ())]
    return tuple(dict.fromkeys(found))


def show_value(value: object) -> str:
    """A setting as a message shows it: lists space-separated, ``None`` as ``unset``."""
    if isinstance(value, list | tuple):
        return " ".join(map(str, value)) or "[]"
    return "unset" if value is None else str(value)


def is_compiling() -> bool:
    """True while ``torch.compile`` traces: data-dependent checks are skipped there (they would
    force a device sync and a graph break)."""
    return torch.compiler.is_compiling()


def check_channels(value: int, name: str, lazy: bool = False) -> int:
    """Return ``value`` if it is a channel count ≥ 1 (or ``-1``, "infer at first call", when
    ``lazy``), else raise naming ``name``."""
    if lazy and not isinstance(value, bool) and value == -1:
        return value
    return positive_int.check(value, name)


def check_divides(heads: int, channels: int, heads_name: str = "heads",
                  channels_name: str = "channels") -> None:
    """Check that ``heads`` splits ``channels`` into equal per-head widths."""
    if channels % heads != 0:
        raise ValueError(
            f"{channels_name} ({channels}) must be divisible by {heads_name} ({heads})"
        )


def check_features(
    x: Tensor,
    name: str = "x",
    width: int | None = None,
    finite: bool = True,
    min_rows: int = 0,
    purpose: str = "",
) -> None:
    """Check that ``x`` is a 2-D float tensor (N, D), ``width`` wide when given (else D ≥ 1: a
    zero-width row has no direction, so cosine similarity, kNN and retrieval are undefined on it),
    finite, with at least ``min_rows`` samples (``purpose`` says why in the message, e.g. "for
    retrieval")."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (N, D), got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(
            f"{name} must be a 2-D tensor of shape (N, D), got shape {tuple(x.shape)}"
        )
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if width is not None and x.size(1) != width:
        raise ValueError(f"{name} must have {width} columns, got shape {tuple(x.shape)}")
    if x.size(1) == 0:
        raise ValueError(
            f"{name} must have at least one feature column (shape (N, D) with D >= 1), "
            f"got shape {tuple(x.shape)}"
        )
    if x.size(0) < min_rows:
        why = f" {purpose}" if purpose else ""
        raise ValueError(
            f"{name} needs at least {min_rows} samples (rows){why}, got shape {tuple(x.shape)}"
        )
    if finite and not is_compiling() and not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).any(dim=1).sum())
        raise NonFiniteError(f"{name} contains NaN or inf values (in {bad} of {x.size(0)} rows)")


def check_labels(
    y: Tensor, num_nodes: int, name: str = "y", num_classes: int | None = None
) -> None:
    """Check that ``y`` is a 1-D integer tensor of ``num_nodes`` entries in ``[0, num_classes)``."""
    if not isinstance(y, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (N,), got {type(y).__name__}")
    if y.dim() != 1 or y.numel() != num_nodes:
        raise ValueError(
            f"{name} must have shape ({num_nodes},) to match the embeddings, got {tuple(y.shape)}"
        )
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got dtype {y.dtype}")
    if num_classes is not None and y.numel() > 0 and not is_compiling():
        low, high = int(y.min()), int(y.max())
        if low < 0 or high >= num_classes:
            raise ValueError(
                f"{name} must lie in [0, {num_classes}), got values in [{low}, {high}]"
            )


def check_edge_index(
    edge_index: Tensor, num_src: int, num_dst: int | None = None, name: str = "edge_index"
) -> None:
    """Check a (2, E) integer edge list whose sources index ``num_src`` and targets ``num_dst``
    nodes."""
    num_dst = num_src if num_dst is None else num_dst
    if not isinstance(edge_index, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (2, E), got "
                        f"{type(edge_index).__name__}")
    if edge_index.dim() != 2 or edge_index.size(0) != 2:
        raise ValueError(f"{name} must have shape (2, E), got {tuple(edge_index.shape)}")
    if edge_index.dtype not in (torch.long, torch.int32):
        raise TypeError(f"{name} must be an int64 (or int32) tensor, got dtype {edge_index.dtype}")
    if edge_index.numel() == 0 or is_compiling():
        return
    src_min, src_max = int(edge_index[0].min()), int(edge_index[0].max())
    dst_min, dst_max = int(edge_index[1].min()), int(edge_index[1].max())
    if src_min < 0 or src_max >= num_src:
        raise ValueError(
            f"{name}[0] (sources) must lie in [0, {num_src}), got values in [{src_min}, {src_max}]"
        )
    if dst_min < 0 or dst_max >= num_dst:
        raise ValueError(
            f"{name}[1] (targets) must lie in [0, {num_dst}), got values in [{dst_min}, {dst_max}]"
        )
