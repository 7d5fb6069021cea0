"""CUDA checks (skipped without a GPU): every attention path of BatchGraphConv on the device
against the float64 CPU sparse kernel, the fused Triton kernel against the sparse path at a
realistic size, an AMP (bf16 and fp16) training step of each method, and the benchmark in quick
mode."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bgf_pyg.graph import knn_edges
from bgf_pyg.models import METHODS, build_backbone, build_method
from bgf_pyg.nn import BatchGraphConv
from bgf_pyg.nn.conv import ATTENTION_PATHS

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("path", ATTENTION_PATHS)
def test_attention_paths_on_cuda_equal_cpu(path):
    if path == "fused" and not HAS_TRITON:
        pytest.skip("Triton is not installed")
    torch.manual_seed(0)
    x = torch.randn(64, 16, dtype=torch.float64)
    edge_index, _ = knn_edges(x, 5)
    cpu = BatchGraphConv(16, 8, heads=2, root_weight=True, attention_path="sparse").double()
    gpu = BatchGraphConv(16, 8, heads=2, root_weight=True, attention_path=path).double()
    gpu.load_state_dict(cpu.state_dict())
    gpu = gpu.cuda()
    out, x_grad, grads = [], [], []
    for conv, device in ((cpu, "cpu"), (gpu, "cuda")):
        inp = x.to(device).requires_grad_(True)
        result = conv(inp, edge_index.to(device))
        result.pow(2).sum().backward()
        out.append(result.cpu())
        x_grad.append(inp.grad.cpu())
        grads.append([p.grad.cpu() for p in conv.parameters()])
    torch.testing.assert_close(out[1], out[0])
    torch.testing.assert_close(x_grad[1], x_grad[0])
    for got, ref in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(got, ref)


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_equals_sparse_on_a_large_knn_graph(dtype):
    torch.manual_seed(0)
    x = torch.randn(4096, 128, device="cuda")
    edge_index, _ = knn_edges(x, 30, loop=True)
    sparse = BatchGraphConv(128, 16, heads=8, add_self_loops=False, attention_path="sparse")
    fused = BatchGraphConv(128, 16, heads=8, add_self_loops=False, attention_path="fused")
    fused.load_state_dict(sparse.state_dict())
    results = []
    for conv in (sparse.cuda(), fused.cuda()):
        inp = x.clone().requires_grad_(True)
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            out = conv(inp, edge_index)
        out.float().pow(2).mean().backward()
        results.append((out.float(), inp.grad))
    tol = {"atol": 1e-4, "rtol": 1e-3} if dtype == torch.float32 else {"atol": 3e-2, "rtol": 3e-2}
    torch.testing.assert_close(results[1][0], results[0][0], **tol)
    torch.testing.assert_close(results[1][1], results[0][1], **tol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", METHODS)
def test_amp_training_step(name, dtype):
    torch.manual_seed(0)
    classes, per_class = 4, 4
    labels = torch.arange(classes).repeat_interleave(per_class).cuda()
    images = torch.randn(labels.numel(), 3, 32, 32, device="cuda")
    backbone = build_backbone("resnet18", 32)
    hparams = {"k": 5, "heads": 4} if name == "bgformer" else {}
    method = build_method(name, backbone, classes, samples_per_class=per_class, **hparams).cuda()
    optimizer = torch.optim.SGD(method.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    with torch.autocast("cuda", dtype=dtype):
        loss = method(images, labels)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    assert math.isfinite(loss.item())
    assert all(torch.isfinite(p).all() for p in method.parameters())


def test_benchmark_quick_mode(tmp_path):
    out = tmp_path / "cuda_quick.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "sparse_vs_dense.py"), "--quick",
         "--device", "cuda", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert out.exists() and out.with_suffix(".png").exists()
