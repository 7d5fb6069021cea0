"""Property tests (hypothesis) of BGFormer on a PyG ``Batch``: equal to the model run on each
graph alone, on every attention path.

Examples are derandomised and few (``tests/strategies.py``), so the file stays within its time
budget.
"""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st
from torch_geometric.data import Batch

from bgf_pyg import build_batch_graph
from bgf_pyg.nn import BGFormer
from tests.strategies import bounded


@bounded(15)
@given(
    sizes=st.lists(st.integers(1, 6), min_size=1, max_size=3),
    labelled=st.lists(st.booleans(), min_size=3, max_size=3),
    k=st.integers(1, 4), loop=st.booleans(), seed=st.integers(0, 2**16),
    semantic_branch=st.sampled_from(["attention", "propagation"]),
    path=st.sampled_from(["sparse", "dense", "auto"]),
)
def test_bgformer_batch_equals_each_graph_alone(sizes, labelled, k, loop, seed, semantic_branch,
                                                path):
    torch.manual_seed(seed)
    graphs = []
    for size, has_pairs in zip(sizes, labelled, strict=False):
        # Labels with same-label pairs, or all distinct (no semantic edge unless loop=True).
        y = torch.randint(0, 2, (size,)) if has_pairs else torch.arange(size)
        graphs.append(build_batch_graph(torch.randn(size, 8, dtype=torch.float64), y, k=k,
                                        loop=loop))
    model = BGFormer(8, heads=2, semantic_branch=semantic_branch, attention_path=path,
                     add_self_loops=not loop).double().eval()
    out = model(Batch.from_data_list(graphs))
    for part, graph in zip(out.split(sizes), graphs, strict=True):
        torch.testing.assert_close(part, model(graph), atol=1e-10, rtol=1e-9)
