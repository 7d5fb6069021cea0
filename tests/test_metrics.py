import importlib.util
import math
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bgf_pyg.knn import rounding_bound
from bgf_pyg.metrics import (
    evaluate_retrieval,
    map_at_r,
    nmi,
    r_precision,
    recall_at_k,
    recall_at_k_query_gallery,
)
from tests.reference import retrieval_reference


def dense_ranking(query, reference, exclude_self):
    """Brute force: reference indices sorted by cosine similarity (self pushed last)."""
    sim = F.normalize(query, dim=1) @ F.normalize(reference, dim=1).t()
    if exclude_self:
        sim.fill_diagonal_(-math.inf)
    order = sim.argsort(dim=1, descending=True, stable=True)
    return order[:, : reference.size(0) - int(exclude_self)]


def brute_recall(query, q_labels, reference, r_labels, k, exclude_self=True):
    order = dense_ranking(query, reference, exclude_self)
    return (r_labels[order[:, :k]] == q_labels[:, None]).any(1).float().mean().item()


def brute_map_r(x, y):
    order = dense_ranking(x, x, exclude_self=True)
    aps, rps = [], []
    for i in range(x.size(0)):
        r = int((y == y[i]).sum()) - 1
        if r == 0:
            continue
        hits = (y[order[i, :r]] == y[i]).tolist()
        correct, ap = 0, 0.0
        for rank, hit in enumerate(hits, start=1):
            if hit:
                correct += 1
                ap += correct / rank
        aps.append(ap / r)
        rps.append(correct / r)
    return sum(aps) / len(aps), sum(rps) / len(rps)


def on_circle(degrees):
    angles = torch.tensor(degrees, dtype=torch.float64).deg2rad()
    return torch.stack([angles.cos(), angles.sin()], dim=1)


def random_data(n=120, dim=6, classes=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=g), torch.randint(0, classes, (n,), generator=g)


def test_recall_hand_example():
    x = torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.1, 1.0]])
    y = torch.tensor([0, 0, 1, 0])
    # 0 and 1 find each other (hit); 2 and 3 find each other across classes (miss).
    assert recall_at_k(x, y, ks=(1,)) == {1: 0.5}
    # Sample 2 is its class's only member, so it never hits.
    assert recall_at_k(x, y, ks=(1, 3))[3] == 0.75


def test_map_at_r_hand_example():
    # Class 0 (4 samples, R = 3) at 0°, 25°, 45°, 100°; singletons 1 and 2 (R = 0, left out).
    x = on_circle([0, 10, 25, 45, 70, 100])
    y = torch.tensor([0, 1, 0, 0, 2, 0])
    # Top-3 hits per query: 0°: (miss, hit, hit), 25°: same, 45°: (hit, miss, miss), 100°: as 0°.
    assert map_at_r(x, y) == pytest.approx((3 * (1 / 2 + 2 / 3) / 3 + 1 / 3) / 4)
    assert r_precision(x, y) == pytest.approx((3 * 2 / 3 + 1 / 3) / 4)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_against_brute_force(seed):
    x, y = random_data(seed=seed)
    ks = (1, 2, 4, 8, 16)
    expected = {k: brute_recall(x, y, x, y, k) for k in ks}
    assert recall_at_k(x, y, ks) == pytest.approx(expected)
    expected_map, expected_rp = brute_map_r(x, y)
    assert map_at_r(x, y) == pytest.approx(expected_map)
    assert r_precision(x, y) == pytest.approx(expected_rp)


def test_query_gallery_against_brute_force():
    q, qy = random_data(n=40, seed=3)
    g, gy = random_data(n=90, seed=4)
    ks = (1, 10, 20, 30, 40)
    expected = {k: brute_recall(q, qy, g, gy, k, exclude_self=False) for k in ks}
    assert recall_at_k_query_gallery(q, qy, g, gy) == pytest.approx(expected)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_single_query_against_a_gallery_against_brute_force(seed):
    q, qy = random_data(n=1, seed=10 + seed)
    g, gy = random_data(n=30, seed=20 + seed)
    ks = (1, 5, 30)
    expected = {k: brute_recall(q, qy, g, gy, k, exclude_self=False) for k in ks}
    assert recall_at_k_query_gallery(q, qy, g, gy, ks) == pytest.approx(expected)
    assert recall_at_k_query_gallery(q, qy, g, gy, ks)[30] == float(bool((gy == qy).any()))


def test_a_query_gallery_search_needs_a_query():
    g, gy = random_data(n=30)
    with pytest.raises(ValueError, match="query_emb needs at least 1 samples"):
        recall_at_k_query_gallery(g[:0], gy[:0], g, gy)


def test_chunked_equals_unchunked():
    x, y = random_data(n=150, seed=5)
    assert evaluate_retrieval(x, y, chunk_size=7, with_nmi=False) == evaluate_retrieval(
        x, y, with_nmi=False
    )
    q, qy, g, gy = x[:50], y[:50], x[50:], y[50:]
    assert recall_at_k_query_gallery(q, qy, g, gy, chunk_size=3) == recall_at_k_query_gallery(
        q, qy, g, gy
    )


def test_evaluate_retrieval_matches_single_metrics():
    x, y = random_data(seed=6)
    out = evaluate_retrieval(x, y, ks=(1, 4))
    assert out == pytest.approx(
        {
            "recall@1": recall_at_k(x, y, (1,))[1],
            "recall@4": recall_at_k(x, y, (4,))[4],
            "map@r": map_at_r(x, y),
            "r_precision": r_precision(x, y),
            "nmi": nmi(x, y),
        }
    )


def test_map_at_r_matches_pytorch_metric_learning():
    from pytorch_metric_learning.distances import CosineSimilarity
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
    from pytorch_metric_learning.utils.inference import CustomKNN

    x, y = random_data(n=200, dim=8, classes=12, seed=7)
    calculator = AccuracyCalculator(
        include=("mean_average_precision_at_r", "r_precision"),
        k="max_bin_count",
        knn_func=CustomKNN(CosineSimilarity()),
    )
    expected = calculator.get_accuracy(x, y)
    assert map_at_r(x, y) == pytest.approx(expected["mean_average_precision_at_r"], abs=1e-6)
    assert r_precision(x, y) == pytest.approx(expected["r_precision"], abs=1e-6)


def test_nmi():
    centres = torch.eye(4) * 10
    y = torch.arange(4).repeat_interleave(10)
    x = centres[y] + 0.01 * torch.randn(40, 4, generator=torch.Generator().manual_seed(0))
    assert nmi(x, y) == pytest.approx(1.0)
    x, y = random_data(seed=8)
    assert nmi(x, y, seed=3) == nmi(x, y, seed=3)
    assert 0.0 <= nmi(x, y) < 0.5


def test_input_errors():
    x, y = random_data(n=10)
    with pytest.raises(ValueError, match="at least 2 samples"):
        recall_at_k(x[:1], y[:1])
    with pytest.raises(ValueError, match="labels"):
        map_at_r(x, y[:5])
    bad = x.clone()
    bad[3, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        evaluate_retrieval(bad, y)
    with pytest.raises(ValueError, match="ks"):
        recall_at_k(x, y, ks=(1, 10))
    with pytest.raises(ValueError, match="at least 2 samples"):
        map_at_r(x[:3], torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="backend"):
        recall_at_k(x, y, backend="annoy")
    with pytest.raises(ValueError, match="gallery_emb"):
        recall_at_k_query_gallery(x, y, x[:, :3], y)


def test_auto_backend_falls_back_to_torch(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # makes `import faiss` fail
    x, y = random_data(seed=9)
    assert recall_at_k(x, y, backend="auto") == recall_at_k(x, y)
    with pytest.raises(ImportError, match="faiss"):
        recall_at_k(x, y, backend="faiss")


@pytest.mark.skipif(importlib.util.find_spec("faiss") is None, reason="needs faiss-cpu")
def test_real_faiss_matches_torch():
    x, y = random_data(seed=11)
    torch_out = evaluate_retrieval(x, y, with_nmi=False)
    assert evaluate_retrieval(x, y, with_nmi=False, backend="faiss") == pytest.approx(torch_out)
    q, qy, g, gy = x[:50], y[:50], x[50:], y[50:]
    assert recall_at_k_query_gallery(q, qy, g, gy, backend="faiss") == pytest.approx(
        recall_at_k_query_gallery(q, qy, g, gy)
    )


def tied_data():
    """Heavy ties across classes: 90 rows that are copies of 3 vectors, labels mixed, so equal
    similarities decide neighbours (and ties run past faiss's extra candidates)."""
    gen = torch.Generator().manual_seed(12)
    base = torch.randn(3, 8, generator=gen)
    pick = torch.randint(0, 3, (90,), generator=gen)
    return base[pick], torch.randint(0, 6, (90,), generator=gen)


@pytest.mark.skipif(importlib.util.find_spec("faiss") is None, reason="needs faiss-cpu")
def test_real_faiss_breaks_ties_as_torch():
    x, y = torch.ones(3, 4), torch.tensor([0, 1, 0])  # three identical embeddings
    for backend in ("torch", "faiss"):
        assert recall_at_k(x, y, ks=(1,), backend=backend)[1] == pytest.approx(1 / 3)
        assert map_at_r(x, y, backend=backend) == pytest.approx(0.5)
    x, y = tied_data()
    torch_out = evaluate_retrieval(x, y, ks=(1, 2, 4, 8, 16), with_nmi=False)
    assert evaluate_retrieval(x, y, ks=(1, 2, 4, 8, 16), with_nmi=False,
                              backend="faiss") == pytest.approx(torch_out)
    q, qy, g, gy = x[:30], y[:30], x[30:], y[30:]
    assert recall_at_k_query_gallery(q, qy, g, gy, ks=(1, 4, 16), backend="faiss") == (
        pytest.approx(recall_at_k_query_gallery(q, qy, g, gy, ks=(1, 4, 16))))


def test_faiss_backend_keeps_the_index_tie_rule(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss",
                        types.SimpleNamespace(IndexFlatIP=ReversedTieFaissIndex))
    x, y = tied_data()
    ks = (1, 2, 4, 8, 16)
    torch_out = evaluate_retrieval(x, y, ks=ks, with_nmi=False)
    assert evaluate_retrieval(x, y, ks=ks, with_nmi=False, backend="faiss") == torch_out
    q, qy, g, gy = x[:30], y[:30], x[30:], y[30:]
    assert recall_at_k_query_gallery(q, qy, g, gy, ks=(1, 4, 16), backend="faiss") == (
        recall_at_k_query_gallery(q, qy, g, gy, ks=(1, 4, 16)))
    x, y = torch.ones(3, 4), torch.tensor([0, 1, 0])
    assert recall_at_k(x, y, ks=(1,), backend="faiss")[1] == pytest.approx(1 / 3)


class FakeFaissIndex:
    """numpy stand-in for ``faiss.IndexFlatIP``, so the faiss branch is tested without faiss."""

    def __init__(self, dim):
        self.data = np.zeros((0, dim), dtype=np.float32)

    def add(self, x):
        self.data = np.concatenate([self.data, x])

    def search(self, q, k):
        sim = q @ self.data.T
        index = np.argsort(-sim, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(sim, index, axis=1), index


class ReversedTieFaissIndex(FakeFaissIndex):
    """faiss stand-in that orders equal scores by *higher* index first (faiss promises no order)."""

    def search(self, q, k):
        sim = q @ self.data.T
        index = np.argsort(-sim[:, ::-1], axis=1, kind="stable")[:, :k]
        index = self.data.shape[0] - 1 - index
        return np.take_along_axis(sim, index, axis=1), index


def test_faiss_backend_matches_torch(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", types.SimpleNamespace(IndexFlatIP=FakeFaissIndex))
    x, y = random_data(seed=10)
    x[5] = x[4]  # a duplicate may rank before the query itself: it must still be dropped
    torch_out = evaluate_retrieval(x, y, with_nmi=False)
    assert evaluate_retrieval(x, y, with_nmi=False, backend="faiss") == pytest.approx(torch_out)
    q, qy, g, gy = x[:50], y[:50], x[50:], y[50:]
    assert recall_at_k_query_gallery(q, qy, g, gy, backend="auto") == pytest.approx(
        recall_at_k_query_gallery(q, qy, g, gy)
    )


def test_metrics_on_one_class_and_too_few_samples():
    emb, labels = torch.randn(6, 4), torch.zeros(6).long()
    result = evaluate_retrieval(emb, labels, ks=(1, 5), with_nmi=True)
    assert result == pytest.approx({"recall@1": 1.0, "recall@5": 1.0, "map@r": 1.0,
                                    "r_precision": 1.0, "nmi": 1.0})
    with pytest.raises(ValueError, match="emb needs at least 2 samples"):
        recall_at_k(torch.randn(1, 4), torch.zeros(1).long(), ks=(1,))
    with pytest.raises(ValueError, match="gallery_emb needs at least 1 samples"):
        recall_at_k_query_gallery(torch.randn(3, 4), torch.arange(3), torch.randn(0, 4),
                                  torch.zeros(0).long(), ks=(1,))


def test_half_precision_metrics_equal_float64_brute_force_with_a_zero_row():
    torch.manual_seed(2)
    emb, labels = torch.randn(20, 6), torch.randint(0, 4, (20,))
    emb[7] = 0.0
    result = evaluate_retrieval(emb.half(), labels, ks=(1, 2, 4), with_nmi=True)
    expected = retrieval_reference(emb.half(), labels, [1, 2, 4])
    assert all(math.isfinite(v) for v in result.values())
    assert {k: result[k] for k in expected} == pytest.approx(expected)


def ternary_data(seed: int):
    """23 embeddings with entries in {-1, 0, 1} (4-d), 3 classes: long blocks of equal
    cosines (0, ±1/2, ±1/√6, ...) that a matrix product computes with rounding noise."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randint(-1, 2, (23, 4), generator=gen).float(),
            torch.arange(23) % 3)


class NoisyFaissIndex(FakeFaissIndex):
    """faiss stand-in whose scores carry rounding noise as a float32 product's may (within
    half of :func:`~bgf_pyg.knn.rounding_bound`), ordering by them."""

    def search(self, q, k):
        sim = (q.astype(np.float64) @ self.data.T.astype(np.float64))
        bound = rounding_bound(q.shape[1], torch.float32)
        noise = np.random.default_rng(0).uniform(-0.5, 0.5, sim.shape) * bound
        sim = (sim + noise).astype(np.float32)
        index = np.argsort(-sim, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(sim, index, axis=1), index


RETRIEVAL_KS = (1, 2, 4, 8)


@pytest.mark.skipif(importlib.util.find_spec("faiss") is None, reason="needs faiss-cpu")
@pytest.mark.parametrize("seed", range(12))
def test_real_faiss_equals_torch_under_long_tie_blocks(seed):
    x, y = ternary_data(seed)
    torch_out = evaluate_retrieval(x, y, ks=RETRIEVAL_KS, with_nmi=False)
    assert evaluate_retrieval(x, y, ks=RETRIEVAL_KS, with_nmi=False, backend="faiss") == torch_out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("index", [FakeFaissIndex, NoisyFaissIndex])
def test_stand_in_faiss_equals_torch_under_long_tie_blocks(monkeypatch, index, dtype):
    """faiss searches in float32 whatever the embeddings' dtype: float64 rows are ranked with
    the bound of faiss's float32 scores."""
    monkeypatch.setitem(sys.modules, "faiss", types.SimpleNamespace(IndexFlatIP=index))
    for seed in range(12):
        x, y = ternary_data(seed)
        x = x.to(dtype)
        torch_out = evaluate_retrieval(x, y, ks=RETRIEVAL_KS, with_nmi=False)
        assert evaluate_retrieval(x, y, ks=RETRIEVAL_KS, with_nmi=False,
                                  backend="faiss") == torch_out


@pytest.mark.parametrize("seed", range(6))
def test_metrics_do_not_depend_on_the_chunk_size(seed):
    """A matrix product rounds by its blocking: a 1-row chunk and a 23-row chunk give orthogonal
    rows cosines 0 and ±1e-9. Ranking is canonical, so neither decides a tie."""
    x, y = ternary_data(seed)
    assert evaluate_retrieval(x, y, ks=RETRIEVAL_KS, with_nmi=False, chunk_size=1) == (
        evaluate_retrieval(x, y, ks=RETRIEVAL_KS, with_nmi=False))
