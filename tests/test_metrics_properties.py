"""Property tests (hypothesis) of the retrieval metrics against brute-force float64 statements
(``tests/reference.py``), with zero rows, chunking and half precision.

Examples are derandomised and few (``tests/strategies.py``), so the file stays within its time
budget.
"""

from __future__ import annotations

import math

import torch
from hypothesis import given
from hypothesis import strategies as st

from bgf_pyg.metrics import evaluate_retrieval
from tests.reference import retrieval_reference
from tests.strategies import bounded, features


@bounded(30)
@given(
    num_samples=st.integers(2, 20), dim=st.integers(1, 5), num_classes=st.integers(1, 5),
    zero_rows=st.integers(0, 2), seed=st.integers(0, 2**16),
    chunk_size=st.one_of(st.none(), st.integers(1, 7)),
    dtype=st.sampled_from([torch.float16, torch.float32, torch.float64]),
)
def test_metrics_match_brute_force(num_samples, dim, num_classes, zero_rows, seed, chunk_size,
                                   dtype):
    emb = features(seed, num_samples, dim, zero_rows, 0, dtype)
    labels = torch.randint(0, num_classes, (num_samples,),
                           generator=torch.Generator().manual_seed(seed + 1))
    if int(labels.unique(return_counts=True)[1].max()) < 2:
        labels[1] = labels[0]  # MAP@R needs one class with two samples
    ks = sorted({1, min(2, num_samples - 1), num_samples - 1})
    result = evaluate_retrieval(emb, labels, ks=ks, with_nmi=False, chunk_size=chunk_size)
    expected = retrieval_reference(emb, labels, ks)
    assert result == {key: result[key] for key in expected}
    for key, value in expected.items():
        assert math.isclose(result[key], value, abs_tol=1e-6), key
