"""Mixed precision: autocast and the gradient scaler of a run."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch


@dataclass
class Precision:
    """Mixed precision on CUDA (autocast + GradScaler); off elsewhere."""

    device: torch.device
    enabled: bool = False
    scaler: torch.amp.GradScaler = field(init=False)

    def __post_init__(self) -> None:
        if self.enabled and self.device.type != "cuda":
            warnings.warn("mixed precision needs CUDA; ignored on " + self.device.type,
                          stacklevel=3)
            self.enabled = False
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.enabled)

    def autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, enabled=self.enabled)
