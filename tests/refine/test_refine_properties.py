"""Property attacks on the refinements (``QueryExpansion``, ``BGFormerRefinement``), in both
forms: the order of the set or gallery changes nothing but the order of the rows, queries are
refined independently, ``k`` beyond the set is refused, duplicate and zero rows stay finite,
and neighbour lists of another set (or one listing an item as its own neighbour) are refused
instead of being read out of range or counted twice."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from bgf_pyg.knn import cosine_topk
from bgf_pyg.refine import BGFormerRefinement, QueryExpansion
from tests.refine.test_retrieval import bgformer_method
from tests.strategies import bounded, features

TOLERANCE = {"atol": 1e-5, "rtol": 1e-5}


def refinement_and_width(which: str, k: int):
    if which == "qe":
        return QueryExpansion(k=k, alpha=2.0, rounds=2), 8
    method = bgformer_method(k=k)
    return BGFormerRefinement.from_method(method), method.backbone.feature_dim


sizes = st.tuples(st.integers(0, 2**16), st.integers(6, 30), st.integers(1, 5))


@bounded(8)
@given(st.sampled_from(["qe", "bgformer"]), sizes)
def test_the_sets_order_only_permutes_the_rows(which, drawn):
    """Tie-free rows: refining a permutation of the set gives the permuted refinement, and a
    query's refinement does not depend on the order of the gallery."""
    seed, n, k = drawn
    refinement, width = refinement_and_width(which, min(k, n - 1))
    x = features(seed, n, width, dtype=torch.float32)
    queries = features(seed + 1, 3, width, dtype=torch.float32)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    gallery, permuted = refinement.refine_gallery(x), refinement.refine_gallery(x[order])
    torch.testing.assert_close(permuted.embeddings, gallery.embeddings[order], **TOLERANCE)
    torch.testing.assert_close(refinement.refine_queries(queries, permuted),
                               refinement.refine_queries(queries, gallery), **TOLERANCE)


@pytest.mark.parametrize("which", ["qe", "bgformer"])
def test_queries_are_refined_independently(which):
    refinement, width = refinement_and_width(which, 3)
    gallery = refinement.refine_gallery(features(1, 15, width, dtype=torch.float32))
    queries = features(2, 4, width, dtype=torch.float32)
    alone = torch.cat([refinement.refine_queries(q[None], gallery) for q in queries])
    torch.testing.assert_close(refinement.refine_queries(queries, gallery), alone, **TOLERANCE)


@pytest.mark.parametrize("which", ["qe", "bgformer"])
def test_k_beyond_the_set_or_gallery_is_refused(which):
    refinement, width = refinement_and_width(which, 5)
    with pytest.raises(ValueError, match=r"^k must lie in \[1, 4\]"):
        refinement.refine_gallery(features(0, 5, width, dtype=torch.float32))
    gallery = refinement_and_width(which, 3)[0].refine_gallery(
        features(0, 4, width, dtype=torch.float32))
    with pytest.raises(ValueError, match=r"^k must lie in \[1, 4\].*the gallery"):
        refinement.refine_queries(features(1, 2, width, dtype=torch.float32), gallery)


@pytest.mark.parametrize("which", ["qe", "bgformer"])
def test_duplicate_and_zero_rows_give_finite_unit_or_zero_rows(which):
    refinement, width = refinement_and_width(which, 3)
    x = features(3, 12, width, zero_rows=2, duplicates=3, dtype=torch.float32)
    gallery = refinement.refine_gallery(x)
    queries = torch.cat([x[:1], x[-1:], torch.zeros(1, width)])  # zero, duplicate, zero
    for out in (gallery.embeddings, refinement.refine_queries(queries, gallery)):
        norms = out.norm(dim=1)
        assert torch.isfinite(out).all()
        assert bool(((norms - 1).abs() < 1e-5).logical_or(norms == 0).all())


@pytest.mark.parametrize("which", ["qe", "bgformer"])
def test_neighbour_lists_of_another_set_are_refused(which):
    refinement, width = refinement_and_width(which, 3)
    x = features(4, 10, width, dtype=torch.float32)
    bigger = features(5, 40, width, dtype=torch.float32)
    sim, index = cosine_topk(bigger, k=3, exclude_self=True)
    with pytest.raises(ValueError, match=r"neighbors' index must lie in \[0, 9\]"):
        refinement.refine_gallery(x, neighbors=(sim[:10], index[:10] + 10))
    gallery = refinement.refine_gallery(x)
    queries = features(6, 2, width, dtype=torch.float32)
    qsim, qindex = cosine_topk(queries, bigger, k=3)
    with pytest.raises(ValueError, match=r"neighbors' index must lie in \[0, 9\].*gallery"):
        refinement.refine_queries(queries, gallery, neighbors=(qsim, qindex.clamp(min=10)))
    with pytest.raises(ValueError, match=r"index must lie in \[0, 9\]"):
        refinement.refine_queries(queries, gallery, neighbors=(qsim, -1 - qindex))


@pytest.mark.parametrize("which", ["qe", "bgformer"])
def test_a_search_that_lists_an_item_as_its_own_neighbour_is_refused(which):
    """A search without ``exclude_self`` finds every item first (similarity 1): used as the
    graph it would count each item twice."""
    refinement, width = refinement_and_width(which, 3)
    x = features(7, 10, width, dtype=torch.float32)
    with pytest.raises(ValueError, match="self-excluded search"):
        refinement.refine_gallery(x, neighbors=cosine_topk(x, k=4, exclude_self=False))


def test_a_gallery_refined_with_another_setting_is_refused():
    """Its states hold another k's (α's, model's) neighbourhoods; an equal setting (a new
    instance) is accepted."""
    x, queries = features(8, 12, 8, dtype=torch.float32), features(9, 2, 8, dtype=torch.float32)
    gallery = QueryExpansion(k=5, alpha=2.0, rounds=2).refine_gallery(x)
    same = QueryExpansion(k=5, alpha=2.0, rounds=2)
    assert same.refine_queries(queries, gallery).shape == (2, 8)
    for other in (QueryExpansion(k=3, alpha=2.0, rounds=2), QueryExpansion(k=5, rounds=2)):
        with pytest.raises(ValueError, match=r"gallery was refined with \('qe', \('k', 5\)"):
            other.refine_queries(queries, gallery)
    first, width = refinement_and_width("bgformer", 3)
    second = refinement_and_width("bgformer", 3)[0]  # the same weights, another model
    gallery = first.refine_gallery(features(8, 12, width, dtype=torch.float32))
    with pytest.raises(ValueError, match="gallery was refined with .*model"):
        second.refine_queries(features(9, 2, width, dtype=torch.float32), gallery)
