"""Which machine a benchmark ran on: the CPU and the kernels torch picked for it decide how float
sums are ordered, so two machines may train the same seed to different weights (and speeds)."""

from __future__ import annotations

import platform

import torch


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; ``platform.processor()`` where it is absent)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next(line.split(":", 1)[1].strip() for line in cpuinfo
                        if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def float_machine() -> dict[str, str]:
    """What decides a CPU run's float results besides its inputs and thread count: the CPU, the
    vector instructions torch's kernels use on it (``AVX2``, ``AVX512``, ...) and torch."""
    return {"cpu_model": cpu_model(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "torch": torch.__version__}
