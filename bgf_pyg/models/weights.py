"""Loading a local pretrained weights file into a backbone, with errors that name the file (no
weights are ever downloaded)."""

from __future__ import annotations

import os

import torch
from torch import Tensor, nn

from ..checks import InputError


def weights_file(path: str | os.PathLike) -> str:
    """``path`` as a string, or ``FileNotFoundError`` when no such file exists."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pretrained weights file not found: {path}")
    return path


def read_state_dict(path: str | os.PathLike) -> tuple[str, dict[str, Tensor]]:
    """``(path, state dict)`` of the local weights file ``path``: ``FileNotFoundError`` when it is
    missing, an ``InputError`` naming it when it is unreadable or holds no state dict."""
    path = weights_file(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for a truncated or foreign file
        raise InputError(f"could not read pretrained weights from {path}: {err}") from err
    if not isinstance(state, dict):
        raise InputError(f"{path} does not hold a state dict (got {type(state).__name__})")
    return path, state


def load_matching_state(
    model: nn.Module, state: dict[str, Tensor], path: str, what: str, skip_prefix: str
) -> None:
    """Load ``state`` (read from ``path``) into ``model``, leaving out the classifier keys under
    ``skip_prefix``; any other missing or unexpected key or shape mismatch is an ``InputError``
    naming ``path`` and ``what`` (e.g. "the backbone")."""
    state = {k: v for k, v in state.items() if not k.startswith(skip_prefix)}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise InputError(f"{path} does not match {what}: {err}") from err
    missing = [k for k in missing if not k.startswith(skip_prefix)]
    if missing or unexpected:
        raise InputError(
            f"{path} does not match {what}: {len(missing)} missing keys "
            f"(e.g. {missing[:2]}), {len(unexpected)} unexpected keys (e.g. {unexpected[:2]})"
        )
