"""Attention entropy of BGFormer's branches (what --tensorboard plots)."""

from __future__ import annotations

import math

import torch

from bgf_pyg import build_batch_graph
from bgf_pyg.nn import AttentionEntropy, BatchGraphConv, BGFormer, attention_entropy
from tests.reference import topk_weights_reference


def test_attention_entropy_matches_a_per_node_loop():
    torch.manual_seed(0)
    x = torch.randn(9, 8)
    graph = build_batch_graph(x, torch.arange(3).repeat(3), k=3)
    conv = BatchGraphConv(8, 4, heads=2)
    with torch.no_grad():
        _, (edge_index, alpha) = conv(x, graph.visual_edge_index, return_attention_weights=True)
    entropies, uniform = [], []
    for node in range(9):
        rows = (edge_index[1] == node).nonzero().flatten().tolist()
        uniform.append(math.log(len(rows)))
        for head in range(2):
            p = [float(alpha[r, head]) for r in rows]
            assert math.isclose(sum(p), 1.0, rel_tol=1e-5)
            entropies.append(-sum(q * math.log(q) for q in p))
    got, got_uniform = attention_entropy(alpha, edge_index[1], 9)
    assert math.isclose(got, sum(entropies) / len(entropies), rel_tol=1e-5)
    assert math.isclose(got_uniform, sum(uniform) / len(uniform), rel_tol=1e-6)
    # Uniform attention reaches the bound; one-hot attention has entropy 0.
    degree = torch.bincount(edge_index[1], minlength=9).float()
    flat = (1.0 / degree[edge_index[1]]).unsqueeze(1)
    assert math.isclose(attention_entropy(flat, edge_index[1], 9)[0], got_uniform, rel_tol=1e-5)
    one_hot, seen = torch.zeros_like(flat), set()
    for e, target in enumerate(edge_index[1].tolist()):
        if target not in seen:
            one_hot[e], seen = 1.0, seen | {target}
    assert attention_entropy(one_hot, edge_index[1], 9)[0] == 0.0


def test_recorder_sees_every_branch_and_leaves_training_unchanged():
    torch.manual_seed(0)
    x = torch.randn(12, 16, requires_grad=True)
    graph = build_batch_graph(x, torch.arange(4).repeat(3), k=4)
    model = BGFormer(16, num_layers=2, heads=2, dropout=0.3).train()
    recorder = AttentionEntropy(model)

    def step():
        torch.manual_seed(1)  # dropout draws the same numbers in both runs
        return model(x, graph.visual_edge_index, graph.semantic_edge_index)

    plain = step()
    recorder.start()
    recorded = step()
    values = recorder.stop()
    torch.testing.assert_close(recorded, plain, atol=0, rtol=0)
    assert model.training and all(m.training for m in model.modules())
    assert set(values) == {"layer0/visual", "layer0/semantic", "layer1/visual", "layer1/semantic"}
    for entropy, uniform in values.values():
        assert 0.0 < entropy <= uniform + 1e-6
    # k = 4 neighbours + the self-loop; 2 same-class mates + the self-loop.
    assert math.isclose(values["layer0/visual"][1], math.log(5), rel_tol=1e-6)
    assert math.isclose(values["layer1/semantic"][1], math.log(3), rel_tol=1e-6)
    assert recorder.stop() == values and not recorder._handles
    step()
    assert recorder.stop() == values  # nothing recorded while inactive


def test_recorder_sees_the_top_k_branch():
    torch.manual_seed(0)
    x = torch.randn(11, 8)
    batch = torch.tensor([0, 0, 1, 0, 1, 0, 1, 0, 1, 1, 0])  # graphs of 6 and 5 nodes
    labels = torch.tensor([0, 1, 2, 0, 2, 1, 3, 0, 3, 2, 1])
    semantic = build_batch_graph(x, labels, k=1).semantic_edge_index
    model = BGFormer(8, num_layers=2, heads=2, visual_graph="attention_topk", k=6).train()
    inputs = {}  # what each layer's top-K branch saw, for the reference

    def keep_input(layer: int):
        def hook(module, args, out) -> None:
            inputs.setdefault(layer, args[0].detach())
        return hook

    for layer, block in enumerate(model.layers):
        block.attn.visual.register_forward_hook(keep_input(layer))
    recorder = AttentionEntropy(model)
    assert sorted(recorder.branches) == ["layer0/semantic", "layer0/visual", "layer1/semantic",
                                         "layer1/visual"]
    recorder.start()
    model(x, None, semantic, batch)
    values = recorder.stop()
    for layer, block in enumerate(model.layers):
        branch = block.attn.visual
        n, h, d = x.size(0), branch.heads, branch.out_channels
        query, key = (lin(inputs[layer]).detach().view(n, h, d)
                      for lin in (branch.lin_query, branch.lin_key))
        rows = topk_weights_reference(query, key, branch.k, batch)
        entropies = [-sum(w * math.log(w) for w in row.values()) for row in rows.values()]
        uniform = [math.log(len(row)) for row in rows.values()]  # K = 6, or the 5-node graph
        entropy, bound = values[f"layer{layer}/visual"]
        assert math.isclose(entropy, sum(entropies) / len(entropies), rel_tol=1e-5)
        assert math.isclose(bound, sum(uniform) / len(uniform), rel_tol=1e-6)
