"""Test-time refinement (``bgf_pyg.refine``): query expansion against an independent dense float64
re-statement, the learned refinement against BGFormer's own visual-only output, the inductive
form, label independence, and the ``--refine`` / ``bgf-eval`` command lines."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch
from torch import nn

from bgf_pyg.cli import main as train_main
from bgf_pyg.eval_cli import main as eval_main
from bgf_pyg.graph import build_batch_graph
from bgf_pyg.knn import cosine_topk
from bgf_pyg.metrics import evaluate_retrieval
from bgf_pyg.models import build_backbone, build_method
from bgf_pyg.nn import BGFormer, ProjectedGraph
from bgf_pyg.refine import BGFormerRefinement, QueryExpansion
from bgf_pyg.refine.protocol import EvalSet, evaluate_refinements, refine_set

# ---------------------------------------------------------------------------- references


def dense_neighbours(sim: list[list[float]], i: int, k: int) -> list[int]:
    """The k most similar other rows of row i: by similarity descending, ties to the lower
    index (the package's documented tie rule), by a plain sort."""
    others = [j for j in range(len(sim)) if j != i]
    return sorted(others, key=lambda j: (-sim[i][j], j))[:k]


def dense_qe(emb: torch.Tensor, k: int, alpha: float, rounds: int = 1) -> torch.Tensor:
    """e'_i = normalise(e_i + Σ_{j ∈ N_k(i)} max(s_ij, 0)^α e_j) in float64, with Python's
    0.0 ** 0 = 1, repeated ``rounds`` times on the refined set's own graph."""
    x = emb.double()
    x = x / x.norm(dim=1, keepdim=True)
    for _ in range(rounds):
        sim = (x @ x.t()).tolist()
        rows = []
        for i in range(len(sim)):
            total = x[i].clone()
            for j in dense_neighbours(sim, i, k):
                total += max(sim[i][j], 0.0) ** alpha * x[j]
            rows.append(total / total.norm())
        x = torch.stack(rows)
    return x


def tied_set() -> torch.Tensor:
    """Float64 rows with exact ties: two isolated duplicates (orthogonal to every other row),
    a duplicated pair among the rest and a row equidistant from two others."""
    torch.manual_seed(0)
    rest = torch.randn(9, 6, dtype=torch.float64)
    rest[1] = rest[0]  # a duplicated pair: every row sees both at the same similarity
    rest[4] = torch.tensor([1.0, 0.0, 0, 0, 0, 0], dtype=torch.float64)
    rest[5] = torch.tensor([0.0, 1.0, 0, 0, 0, 0], dtype=torch.float64)
    rest[6] = torch.tensor([1.0, 1.0, 0, 0, 0, 0], dtype=torch.float64)  # tied to rows 4 and 5
    rows = torch.zeros(11, 8, dtype=torch.float64)
    rows[:9, :6] = rest
    rows[9, 7] = rows[10, 7] = 2.0  # isolated duplicates: cosine 0 to every other row
    return rows


# ---------------------------------------------------------------------------- query expansion


@pytest.mark.parametrize("k,alpha,rounds", [(1, 0.0, 1), (3, 0.0, 1), (3, 1.0, 1), (4, 3.0, 1),
                                            (3, 0.5, 2), (10, 2.0, 3)])
def test_qe_equals_the_dense_float64_statement_with_ties(k, alpha, rounds):
    emb = tied_set()
    ours = QueryExpansion(k=k, alpha=alpha, rounds=rounds).refine(emb)
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, dense_qe(emb, k, alpha, rounds), rtol=0, atol=1e-12)


def test_qe_on_random_float32_and_alpha_zero_is_the_plain_mean():
    torch.manual_seed(1)
    emb = torch.randn(40, 16)
    torch.testing.assert_close(QueryExpansion(k=5, alpha=2.0).refine(emb).double(),
                               dense_qe(emb, 5, 2.0), atol=1e-5, rtol=0)
    # α = 0: 0⁰ = 1, so even negatively similar neighbours weigh 1 (the mean of k + 1 rows).
    unit = emb / emb.norm(dim=1, keepdim=True)
    index = cosine_topk(emb, k=39, exclude_self=True)[1]
    mean = unit + unit[index].sum(dim=1)
    torch.testing.assert_close(QueryExpansion(k=39, alpha=0.0).refine(emb),
                               mean / mean.norm(dim=1, keepdim=True), atol=1e-5, rtol=0)


def test_qe_reuses_a_deeper_search():
    torch.manual_seed(2)
    emb = torch.randn(30, 8)
    deeper = cosine_topk(emb, k=12, exclude_self=True)
    qe = QueryExpansion(k=4, alpha=1.0)
    # The same graph (the fresh search runs on the re-normalised rows: float32 rounding only).
    torch.testing.assert_close(qe.refine(emb, neighbors=deeper), qe.refine(emb), rtol=0,
                               atol=1e-6)
    with pytest.raises(ValueError, match="neighbors"):
        qe.refine(emb, neighbors=cosine_topk(emb, k=3, exclude_self=True))


def test_bad_arguments_name_themselves():
    emb = torch.randn(6, 4)
    with pytest.raises(ValueError, match=r"^k must lie in \[1, 5\]"):
        QueryExpansion(k=6).refine(emb)
    with pytest.raises(ValueError, match="alpha"):
        QueryExpansion(alpha=-1.0)
    with pytest.raises(ValueError, match="rounds"):
        QueryExpansion(rounds=0)
    with pytest.raises(ValueError, match="visual_graph"):
        model = BGFormer(8, num_layers=1, heads=2)
        model.visual_graph = "attention_topk"
        BGFormerRefinement(model, None, k=2)
    plain = build_method("plain", build_backbone("smallcnn", 8))
    with pytest.raises(ValueError, match="method must be a BGFormerMethod"):
        BGFormerRefinement.from_method(plain)
    with pytest.raises(TypeError, match="bgformer must be a BGFormer or a ProjectedGraph "
                                        "around one, got ProjectedGraph around Linear"):
        other = nn.Linear(4, 4)
        other.channels = 4
        BGFormerRefinement(ProjectedGraph(8, other), None, k=2)


# ---------------------------------------------------------------------------- learned


def bgformer_method(k: int = 4, lam: float = 0.5, dropout: float = 0.1,
                    graph_dim: int | None = None):
    torch.manual_seed(3)
    return build_method("bgformer", build_backbone("smallcnn", 8), loss="multi_similarity",
                        k=k, lam=lam, heads=2, num_layers=2, dropout=dropout,
                        graph_dim=graph_dim)


@pytest.mark.parametrize("graph_dim", [None, 16])
@pytest.mark.parametrize("lam", [0.5, 1.0])
def test_learned_equals_bgformer_visual_only_then_the_head(lam, graph_dim):
    method = bgformer_method(lam=lam, graph_dim=graph_dim)
    method.train()  # the refinement runs in eval mode and gives the mode back
    features = torch.randn(25, method.backbone.feature_dim)
    ours = BGFormerRefinement.from_method(method).refine(features)
    assert method.training
    method.eval()
    graph = build_batch_graph(features, None, k=4)  # the training graph, no labels
    assert graph.num_semantic_edges == 0
    with torch.no_grad():
        if graph_dim is None:
            refined = method.bgformer(graph)
        else:  # between the projections, the kNN graph the features' own (as in training)
            projected = method.bgformer
            assert isinstance(projected, ProjectedGraph) and projected.graph.channels == 16
            refined = projected.lin_out(projected.graph(projected.lin_in(features),
                                                        graph.visual_edge_index))
        expected = method.backbone.head(refined)
    torch.testing.assert_close(ours, expected / expected.norm(dim=1, keepdim=True))


# ---------------------------------------------------------------------------- inductive


def test_inductive_qe_is_the_query_row_of_the_transductive_refinement():
    """One round: a query's refinement reads only its own neighbours among the gallery and
    their unrefined embeddings, so it equals the query's row of the transductive refinement of
    gallery ∪ {query}, whatever the query does to the gallery rows there (here one query is a
    gallery item's exact copy). The gallery's own refined embeddings are left unchanged."""
    torch.manual_seed(4)
    gallery = torch.randn(30, 8, dtype=torch.float64)
    queries = torch.cat([torch.randn(3, 8, dtype=torch.float64), gallery[7:8]])
    qe = QueryExpansion(k=5, alpha=2.0)
    refined = qe.refine_gallery(gallery)
    before = [s.clone() for s in [refined.embeddings, *refined.states]]
    ours = qe.refine_queries(queries, refined)
    for i, query in enumerate(queries):
        together = qe.refine(torch.cat([gallery, query[None]]))
        torch.testing.assert_close(ours[i], together[-1], rtol=0, atol=1e-12)
    for old, new in zip(before, [refined.embeddings, *refined.states], strict=True):
        assert torch.equal(old, new)
    torch.testing.assert_close(refined.embeddings, qe.refine(gallery), rtol=0, atol=0)


@pytest.mark.parametrize("which", ["qe", "bgformer", "bgformer, graph_dim"])
def test_inductive_equals_transductive_on_the_gallerys_own_copy(which):
    """The gallery refined again as queries (its own copy), each query given its item's
    gallery neighbours without the item itself (the transductive graph), gives the
    transductive refinement: the query attends to itself and those neighbours, and (learned)
    is normalised with the gallery's GraphNorm statistics, which are its own set's. Searched
    freely, a copy would also find its original (similarity 1), and differ."""
    torch.manual_seed(5)
    method = bgformer_method(k=4, graph_dim=16 if which.endswith("graph_dim") else None)
    if which == "qe":
        refinement, x = QueryExpansion(k=4, alpha=1.0), torch.randn(20, 8)
    else:
        refinement = BGFormerRefinement.from_method(method)
        x = torch.randn(20, method.backbone.feature_dim)
    gallery = refinement.refine_gallery(x)
    own = cosine_topk(x, k=4, exclude_self=True)
    torch.testing.assert_close(refinement.refine_queries(x, gallery, neighbors=own),
                               gallery.embeddings, atol=1e-5, rtol=1e-5)
    free = refinement.refine_queries(x, gallery)
    assert not torch.allclose(free, gallery.embeddings, atol=1e-3)


def test_inductive_learned_queries_are_independent_and_leave_the_gallery():
    method = bgformer_method()
    refinement = BGFormerRefinement.from_method(method)
    torch.manual_seed(6)
    gallery = refinement.refine_gallery(torch.randn(30, method.backbone.feature_dim))
    before = [s.clone() for s in [gallery.embeddings, *gallery.states]]
    queries = torch.randn(5, method.backbone.feature_dim)
    together = refinement.refine_queries(queries, gallery)
    alone = torch.cat([refinement.refine_queries(q[None], gallery) for q in queries])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    for old, new in zip(before, [gallery.embeddings, *gallery.states], strict=True):
        assert torch.equal(old, new)


# ---------------------------------------------------------------------------- labels


def eval_set(method, n: int, generator: torch.Generator, gallery: bool = False) -> EvalSet:
    features = torch.randn(n, method.backbone.feature_dim, generator=generator)
    with torch.no_grad():
        emb = method.backbone.head(features)
    labels = torch.arange(n) % 4
    return EvalSet(features, emb / emb.norm(dim=1, keepdim=True), labels,
                   eval_set(method, n + 3, generator) if gallery else None)


@pytest.mark.parametrize("gallery", [False, True])
@pytest.mark.parametrize("name,setting", [("qe", {"k": 3, "alpha": 1.0}), ("bgformer", {"k": 3})])
def test_refinement_never_reads_labels(name, setting, gallery):
    method = bgformer_method().eval()
    data = eval_set(method, 16, torch.Generator().manual_seed(7), gallery)
    permuted = EvalSet(data.features, data.embeddings, data.labels[torch.randperm(16)],
                       None if data.gallery is None else EvalSet(
                           data.gallery.features, data.gallery.embeddings,
                           -data.gallery.labels - 1))
    first = refine_set(name, method, setting, data)
    second = refine_set(name, method, setting, permuted)
    for a, b in zip(first, second, strict=True):
        assert (a is None and b is None) or torch.equal(a, b)


def test_protocol_chooses_on_validation_and_shares_the_search():
    method = bgformer_method().eval()
    generator = torch.Generator().manual_seed(8)
    test, val = eval_set(method, 24, generator), eval_set(method, 20, generator)
    records = evaluate_refinements(method, test, val, ["none", "qe"], ks=[2, 4],
                                   alphas=[0.0, 1.0], with_nmi=False)
    val_qe = [r for r in records if r["refine"] == "qe" and r["split"] == "val"]
    assert len(val_qe) == 4
    best = max(val_qe, key=lambda r: r["recall@1"])
    test_qe = next(r for r in records if r["refine"] == "qe" and r["split"] == "test")
    assert (test_qe["refine_k"], test_qe["refine_alpha"]) == (best["refine_k"],
                                                               best["refine_alpha"])
    assert test_qe["selected_on"] == "val"
    refined = QueryExpansion(best["refine_k"], best["refine_alpha"]).refine(test.embeddings)
    expected = evaluate_retrieval(refined, test.labels, with_nmi=False)
    assert {k: test_qe[k] for k in expected} == pytest.approx(expected)
    none = next(r for r in records if r["refine"] == "none" and r["split"] == "test")
    assert none["recall@1"] == pytest.approx(
        evaluate_retrieval(test.embeddings, test.labels, with_nmi=False)["recall@1"])
    with pytest.raises(ValueError, match="refine_k / refine_alpha"):
        evaluate_refinements(method, test, None, ["qe"], ks=[2, 4])
    with pytest.raises(ValueError, match=r"k \(20\) must be smaller"):
        evaluate_refinements(method, test, val, ["qe"], ks=[20])
    with pytest.raises(ValueError, match="refinements must be names among none, qe, bgformer"):
        evaluate_refinements(method, test, val, ["rerank"])


# ---------------------------------------------------------------------------- command lines

TINY = ["--epochs", "1", "--embedding-dim", "16", "--samples-per-class", "4",
        "--graph-heads", "2", "--graph-layers", "1", "--eval-every", "1",
        "--device", "cpu", "--no-augment", "--no-progress"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("refine") / "run"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = train_main([*TINY, "--out", str(out), "--refine", "none,qe,bgformer",
                           "--refine-k", "3", "5", "--refine-alpha", "0", "3"])
    return code, stdout.getvalue(), out


def test_train_refine_prints_one_row_per_refinement(tiny_run):
    code, text, out = tiny_run
    assert code == 0
    test_table = text.split("\n\n")[0].splitlines()
    rows = [line for line in test_table if line.startswith("| bgformer")]
    assert rows[0].startswith("| bgformer, refine none |")
    assert rows[1].startswith("| bgformer, refine qe (k ")
    assert rows[2].startswith("| bgformer, refine bgformer (k ")
    assert "Validation classes" in text
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    refined = [r for r in records if "refine" in r]
    assert {(r["refine"], r["split"]) for r in refined} == {
        (n, s) for n in ("none", "qe", "bgformer") for s in ("val", "test")}
    assert len([r for r in refined if r["refine"] == "qe" and r["split"] == "val"]) == 4
    assert all(r["final"] for r in refined)


def test_bgf_eval_reproduces_the_runs_refinements(tiny_run, capsys):
    _, text, out = tiny_run
    path = out.parent / "eval.json"
    assert eval_main([str(out), "--refine", "qe,bgformer", "--refine-k", "3", "5",
                      "--refine-alpha", "0", "3", "--device", "cpu", "--json", str(path)]) == 0
    printed = capsys.readouterr().out
    assert printed.split("\n\n")[0].splitlines()[-3:] == text.split("\n\n")[0].splitlines()[-3:]
    records = json.loads(path.read_text())
    assert {r["refine"] for r in records} == {"none", "qe", "bgformer"}


def test_train_refines_with_a_projected_bgformer(tmp_path):
    """``--graph-dim``: the learned refinement runs BGFormer between its projections, through
    bgf-train and again through bgf-eval from the saved run."""
    out = tmp_path / "run"
    with contextlib.redirect_stdout(io.StringIO()) as stdout:
        assert train_main([*TINY, "--graph-dim", "8", "--out", str(out),
                           "--refine", "bgformer", "--refine-k", "3"]) == 0
    assert "| bgformer, refine bgformer (k 3) |" in stdout.getvalue()
    path = tmp_path / "eval.json"
    with contextlib.redirect_stdout(io.StringIO()):
        assert eval_main([str(out), "--refine", "bgformer", "--refine-k", "3", "--device",
                          "cpu", "--json", str(path)]) == 0
    trained = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in trained if r.get("refine") == "bgformer" and r["split"] == "test"]
    evaluated = [r for r in json.loads(path.read_text())
                 if r["refine"] == "bgformer" and r["split"] == "test"]
    assert len(trained) == len(evaluated) == 1
    assert evaluated[0]["recall@1"] == pytest.approx(trained[0]["recall@1"])


@pytest.mark.parametrize("argv,fragment", [
    (["--refine", "rerank"], "expected comma-separated names among none, qe, bgformer"),
    (["--method", "plain", "--refine", "bgformer"], "--refine bgformer needs a trained BGFormer"),
    (["--refine", "qe", "--refine-k", "3", "5", "--select-on", "last"],
     "a grid of settings is chosen on the validation classes"),
    (["--refine-alpha", "1"], "--refine-alpha has no effect"),
])
def test_train_refine_bad_input(argv, fragment, capsys, tmp_path):
    code = train_main([*argv, "--out", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("bgf-train: error:")
    assert fragment in err[0]
    assert not (tmp_path / "run").exists()


def test_train_refine_k_not_smaller_than_the_set(capsys, tmp_path):
    code = train_main([*TINY, "--refine", "qe", "--refine-k", "5000", "--select-on", "last",
                       "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("bgf-train: error: --refine-k 5000 (qe) must be "
                                            "smaller than the smallest set refined")
    assert not (tmp_path / "run" / "last.pt").exists()  # refused before training


@pytest.mark.parametrize("argv,fragment", [
    (["--refine", "rerank"], "expected comma-separated names among none, qe, bgformer"),
    (["--refine", "qe", "--refine-k", "5000"], "--refine-k 5000 (qe) must be smaller"),
])
def test_bgf_eval_bad_input(tiny_run, argv, fragment, capsys):
    code = eval_main([str(tiny_run[2]), "--device", "cpu", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("bgf-eval: error:") and fragment in err[-1]


def test_bgf_eval_refuses_bgformer_for_another_method(tmp_path, capsys):
    out = tmp_path / "plain"
    with contextlib.redirect_stdout(io.StringIO()):
        assert train_main(["--method", "plain", "--epochs", "1", "--embedding-dim", "16",
                           "--samples-per-class", "4", "--device", "cpu", "--no-augment",
                           "--no-progress", "--out", str(out)]) == 0
    code = eval_main([str(out), "--device", "cpu", "--refine", "bgformer"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("bgf-eval: error: --refine bgformer needs")
