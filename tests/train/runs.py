"""A tiny run for the tests of the training parts: noisy images (NumPy and torch RNGs), a model
with dropout, a scheduler, and the loop of ``fit`` without its run folder."""

from __future__ import annotations

import io

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from bgf_pyg.data import AugmentedLoader, ClassBalancedBatchSampler
from bgf_pyg.models import EmbeddingNet, build_method, build_optimizer
from bgf_pyg.train import Precision, TrainingState, train_one_epoch

NUM_CLASSES, PER_CLASS, SIDE = 4, 6, 4


class NoisyImages(Dataset):
    """Images whose noise is drawn from NumPy's and torch's global RNGs at every access: a
    resumed run repeats the uninterrupted one only if both come back."""

    def __init__(self) -> None:
        generator = torch.Generator().manual_seed(3)
        self.images = torch.randn(NUM_CLASSES * PER_CLASS, 1, SIDE, SIDE, generator=generator)
        self.labels = torch.arange(NUM_CLASSES).repeat_interleave(PER_CLASS)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        noise = torch.from_numpy(np.random.standard_normal((1, SIDE, SIDE))).float()
        return self.images[index] + 0.1 * noise + 0.1 * torch.randn(1, SIDE, SIDE), \
            self.labels[index]


def make_state(init_seed: int, batches: str) -> TrainingState:
    """A fresh run: weights from ``init_seed``, a loader of ``batches`` (``"shuffled"``,
    ``"balanced"`` or ``"augmented"``: balanced, with its own augmentation stream), a model with
    dropout (the torch RNG) and a scheduler."""
    torch.manual_seed(init_seed)
    trunk = nn.Sequential(nn.Flatten(), nn.Dropout(0.3), nn.Linear(SIDE * SIDE, 12))
    method = build_method("plain", EmbeddingNet(trunk, 12, 6), NUM_CLASSES)
    optimizer = build_optimizer(method, 1e-2, 1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.5)
    data = NoisyImages()
    if batches == "shuffled":
        loader = DataLoader(data, batch_size=6, shuffle=True,
                            generator=torch.Generator().manual_seed(7))
    elif batches == "balanced":
        loader = DataLoader(data, batch_sampler=ClassBalancedBatchSampler(data.labels, 2, 3),
                            generator=torch.Generator().manual_seed(7))
    else:  # the images' torch noise from the loader's own stream
        loader = AugmentedLoader(data, batch_sampler=ClassBalancedBatchSampler(data.labels, 2, 3),
                                 generator=torch.Generator().manual_seed(7),
                                 augmentation=torch.Generator().manual_seed(11))
    return TrainingState(method, optimizer, loader, Precision(torch.device("cpu")), scheduler)


class Stop(Exception):
    """Ends a run at a chosen point, carrying the state dict taken there."""


def train(state: TrainingState, epochs: int, stop_at: tuple[int, int] | None = None) -> None:
    """The loop of ``fit`` without its run folder; ``stop_at=(epochs_done, step)`` raises
    :class:`Stop` with the state dict taken after that step (or epoch end, step 0)."""

    def after_step(step: int, loss_sum: float) -> None:
        state.step, state.loss_sum = step, loss_sum
        if (state.epoch, step) == stop_at:
            raise Stop(state.state_dict())

    while state.epoch < epochs:
        state.begin_epoch()
        train_one_epoch(state.method, state.loader, state.optimizer, state.precision,
                        done=(state.step, state.loss_sum), checkpoint=after_step)
        state.scheduler.step()
        state.end_epoch()
        if (state.epoch, 0) == stop_at:
            raise Stop(state.state_dict())


def through_a_file(state_dict: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    return torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
