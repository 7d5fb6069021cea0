"""Library errors name the library's parameters (``samples_per_class``); only the command line
speaks in its flags (``--samples-per-class``), rewriting the parameters an error names. Bad
constructor arguments and too-small batches fail at once, naming the argument."""

from __future__ import annotations

import ast
import math
import re
from pathlib import Path

import pytest
import torch

from bgf_pyg import build_batch_graph
from bgf_pyg.arguments import with_option_names
from bgf_pyg.checks import InputError, named_parameters, naming
from bgf_pyg.cli import main
from bgf_pyg.knn import cosine_topk
from bgf_pyg.losses import BatchGraphLoss, LabelSmoothingCE, PairwiseCrossEntropyLoss, ProxyGMLLoss
from bgf_pyg.metrics import (
    evaluate_retrieval,
    map_at_r,
    nmi,
    r_precision,
    recall_at_k,
    recall_at_k_query_gallery,
)
from bgf_pyg.models import build_backbone, build_method
from bgf_pyg.nn import BatchGraphConv, BGFormer, BGFormerLayer, DualSSA, IntraBatchMPN
from bgf_pyg.nn.intra_batch import IntraBatchAttention, IntraBatchLayer
from bgf_pyg.refine import QueryExpansion
from bgf_pyg.run_folder import LAST_CHECKPOINT, check_run_folder

PACKAGE = Path(__file__).resolve().parents[1] / "bgf_pyg"
#: The command-line layer, which may name its own flags.
CLI_MODULES = {"cli.py", "arguments.py", "sweep.py", "eval_cli.py"}
#: Flags of other programs a library error may name (torchrun's).
FOREIGN_FLAGS = {"--nproc_per_node"}
FLAG = re.compile(r"(?<![\w-])--[a-z][\w-]*")


def raised_texts(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every string constant inside a ``raise`` statement of ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Raise):
            found += [(part.lineno, part.value) for part in ast.walk(node)
                      if isinstance(part, ast.Constant) and isinstance(part.value, str)]
    return found


def test_library_errors_name_no_command_line_flag():
    modules = [p for p in PACKAGE.rglob("*.py") if p.relative_to(PACKAGE).as_posix()
               not in CLI_MODULES]
    assert len(modules) > 20
    flags = [f"{path.relative_to(PACKAGE)}:{line}: {flag}" for path in modules
             for line, text in raised_texts(path) for flag in FLAG.findall(text)
             if flag not in FOREIGN_FLAGS]
    assert flags == []


def test_the_scan_finds_a_flag(tmp_path):
    module = tmp_path / "m.py"
    module.write_text('def f(n):\n    raise ValueError(f"--samples-per-class {n} is too small")\n')
    assert [f for _, text in raised_texts(module) for f in FLAG.findall(text)] == [
        "--samples-per-class"]


def test_a_library_error_names_the_parameter_and_the_cli_its_flag(tmp_path, capsys):
    (tmp_path / LAST_CHECKPOINT).write_bytes(b"")
    with pytest.raises(InputError) as caught:
        check_run_folder(tmp_path, resume=False, overwrite=False)
    message = str(caught.value)
    assert "resume=True" in message and "overwrite=True" in message and "--" not in message
    assert main(["--method", "plain", "--out", str(tmp_path), "--epochs", "1",
                 "--no-progress"]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line == (f"bgf-train: error: {tmp_path} already holds a run ({LAST_CHECKPOINT}); "
                    "continue it with --resume, replace it with --overwrite, or pass --out "
                    "ANOTHER_FOLDER")


def test_build_method_names_samples_per_class():
    with pytest.raises(ValueError, match=r"^samples_per_class=1 leaves no positive pairs") as err:
        build_method("plain", build_backbone("smallcnn", 8), 4, loss="multi_similarity",
                     samples_per_class=1)
    assert named_parameters(err.value) == ("samples_per_class",)
    assert with_option_names(str(err.value), named_parameters(err.value)).startswith(
        "--samples-per-class 1 leaves no positive pairs")


def test_option_names_leave_words_paths_and_longer_names_alone():
    message = ("/data/out/val_classes holds out.pt; pass out=DIR, not val_classes_x; k=3 "
               "gives k neighbours; val_classes.")
    assert with_option_names(message, ("out", "k", "val_classes")) == (
        "/data/out/val_classes holds out.pt; pass --out DIR, not val_classes_x; --k 3 "
        "gives k neighbours; --val-classes.")


def test_parameters_are_found_through_the_chain_of_causes():
    try:
        try:
            raise naming(ValueError("epochs=0"), "epochs")
        except ValueError as inner:
            raise InputError("wrapped") from inner
    except InputError as outer:
        assert named_parameters(outer) == ("epochs",)


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: BatchGraphConv(8, 0), "out_channels must be >= 1"),
        (lambda: BatchGraphConv(8, 4, heads=0), "heads must be >= 1"),
        (lambda: BatchGraphConv(8, 4.0), "out_channels must be an int"),
        (lambda: BatchGraphConv(0, 4), "in_channels must be >= 1"),
        (lambda: BatchGraphConv((8, 0), 4), r"in_channels\[1\] must be >= 1"),
        (lambda: BatchGraphConv((8, 4, 2), 4), "in_channels must be an int or a pair"),
        (lambda: BatchGraphConv(8, 4, dropout=-0.1), r"dropout must lie in \[0, 1\)"),
        (lambda: BatchGraphConv(8, 4, dropout=math.nan), "dropout must lie"),
        (lambda: BatchGraphConv(8, 4, edge_dim=0), "edge_dim must be >= 1"),
        (lambda: DualSSA(8, heads=3), r"channels \(8\) must be divisible by heads \(3\)"),
        (lambda: DualSSA(8, heads=2, dropout=1.5), "dropout must lie"),
        (lambda: DualSSA(8, heads=2, lam=math.nan), r"lam must lie in \[0, 1\]"),
        (lambda: BGFormerLayer(0, heads=1), "channels must be >= 1"),
        (lambda: BGFormerLayer(8, heads=2, dropout=-1.0), "dropout must lie"),
        (lambda: BGFormer(8, heads=0), "heads must be >= 1"),
        (lambda: BGFormer(8, num_layers=0), "num_layers must be >= 1"),
        (lambda: IntraBatchAttention(8, heads=3), r"channels \(8\) must be divisible"),
        (lambda: IntraBatchLayer(8, ffn_ratio=0), "ffn_ratio must be >= 1"),
        (lambda: IntraBatchMPN(8, heads=3), r"in_channels \(8\) must be divisible by heads"),
        (lambda: IntraBatchMPN(8, heads=2, dropout=2.0), "dropout must lie"),
        (lambda: LabelSmoothingCE(temperature=math.inf), "temperature must be a finite"),
        (lambda: LabelSmoothingCE(epsilon=math.nan), r"epsilon must lie in \[0, 1\]"),
        (lambda: ProxyGMLLoss(0, 8), "num_classes must be >= 1"),
        (lambda: ProxyGMLLoss(3, 8, r=math.nan), "r must lie"),
        (lambda: ProxyGMLLoss(3, 8, weight_lambda=math.inf), "weight_lambda must be a finite"),
        (lambda: ProxyGMLLoss(3, 8, proxies_per_class=0), "proxies_per_class must be >= 1"),
    ],
)
def test_bad_constructor_arguments_fail_in_the_constructor(build, match):
    with pytest.raises((ValueError, TypeError), match=match):
        build()


def test_empty_and_single_row_batches_are_refused_by_name():
    with pytest.raises(ValueError, match="logits needs at least 1 samples"):
        LabelSmoothingCE()(torch.randn(0, 3), torch.zeros(0).long())
    with pytest.raises(ValueError, match="embeddings needs at least 1 samples"):
        ProxyGMLLoss(3, 4)(torch.randn(0, 4), torch.zeros(0).long())
    mpn = IntraBatchMPN(8, heads=2, num_classes=3)
    with pytest.raises(ValueError, match="x needs at least 2 samples .*training mode"):
        mpn.train()(torch.randn(1, 8))
    logits, h = mpn.eval()(torch.randn(1, 8))  # evaluation uses running statistics: fine
    assert logits.shape == (1, 3) and torch.isfinite(h).all()


ZERO_WIDTH = torch.randn(12, 0)
LABELS = torch.arange(12) % 3


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda: build_batch_graph(ZERO_WIDTH, LABELS, k=2), "x"),
        (lambda: cosine_topk(ZERO_WIDTH, k=2), "query"),
        (lambda: recall_at_k(ZERO_WIDTH, LABELS, ks=[1]), "emb"),
        (lambda: map_at_r(ZERO_WIDTH, LABELS), "emb"),
        (lambda: r_precision(ZERO_WIDTH, LABELS), "emb"),
        (lambda: nmi(ZERO_WIDTH, LABELS), "emb"),
        (lambda: evaluate_retrieval(ZERO_WIDTH, LABELS), "emb"),
        (lambda: recall_at_k_query_gallery(ZERO_WIDTH, LABELS, ZERO_WIDTH, LABELS, ks=[1]),
         "query_emb"),
        (lambda: PairwiseCrossEntropyLoss(samples_per_class=2)(ZERO_WIDTH, LABELS), "embeddings"),
        (lambda: QueryExpansion(k=2).refine(ZERO_WIDTH), "emb"),
        (lambda: BatchGraphConv(-1, 4)(ZERO_WIDTH, torch.zeros(2, 0, dtype=torch.long)), "x"),
    ],
)
def test_zero_width_features_are_refused_by_name_at_every_entry_point(call, name):
    """One rule: a (N, 0) embedding has no direction (no cosine, no neighbours), so every entry
    point that takes features refuses it, naming its argument; modules of a fixed width refuse
    it as a width mismatch."""
    with pytest.raises(ValueError, match=rf"^{name} must have at least one feature column .*"
                                         r"got shape \(12, 0\)"):
        call()


def test_zero_width_features_are_a_width_mismatch_for_modules_of_a_fixed_width():
    with pytest.raises(ValueError, match=r"^features must have 8 columns, got shape \(12, 0\)"):
        BatchGraphLoss(torch.nn.MSELoss(), BGFormer(8, heads=2))(ZERO_WIDTH, LABELS)
    with pytest.raises(ValueError, match=r"^embeddings must have 8 columns"):
        ProxyGMLLoss(3, 8)(ZERO_WIDTH, LABELS)
    with pytest.raises(ValueError, match=r"^reference must have 3 columns, got shape \(12, 0\)"):
        cosine_topk(torch.randn(4, 3), ZERO_WIDTH, k=2)
