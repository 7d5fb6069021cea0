"""bgf_pyg.experiment.run: one configuration in, the trained run's result out; the docs' Python
example (docs/experiments.rst) runs as written (with a shorter training); a BGFormer run whose
graph term weighs 0 is a plain run (its control)."""

from __future__ import annotations

import itertools
import json
import re
import textwrap
from pathlib import Path

import pytest
import torch

from bgf_pyg import config as config_module
from bgf_pyg.config import configure
from bgf_pyg.data import DigitsDemo
from bgf_pyg.experiment import Result, run
from bgf_pyg.experiment.build import build_run_method, train_loader
from bgf_pyg.experiment.splits import config_splits
from bgf_pyg.run_folder import read_metrics
from bgf_pyg.train import LAST_CHECKPOINT, load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
#: One short epoch of the demo, evaluated once.
SHORT = {"epochs": 1, "embedding_dim": 8, "device": "cpu", "no_progress": True,
         "no_augment": True}


def test_run_returns_the_selected_weights_metrics(tmp_path, tiny_eval):
    config = configure(method="plain", samples_per_class=60, out=str(tmp_path / "a"), **SHORT)
    result = run(config)
    assert isinstance(result, Result) and result.config is config
    assert (result.epochs, result.start_epoch, result.selected_epoch) == (1, 0, 1)
    final = [r for r in read_metrics(tmp_path / "a") if r.get("final")][-1]
    assert result.test_metrics["recall@1"] == final["recall@1"]
    header = json.loads((tmp_path / "a" / "metrics.jsonl").read_text().splitlines()[0])
    assert header["config"]["method"] == "plain" and header["config"]["lr"] == 1e-3
    table = result.table().splitlines()
    assert table[0].startswith("Test-split retrieval") and table[-1].startswith("| plain |")
    again = run(config.replace(seed=1, out=str(tmp_path / "b")))
    assert again.config.seed == 1 and again.out == tmp_path / "b"


def test_the_docs_python_example_runs(tmp_path, monkeypatch, tiny_eval):
    page = (ROOT / "docs" / "experiments.rst").read_text(encoding="utf-8")
    (block,) = re.findall(r"^\.\. code-block:: python\n\n((?:(?: {4}.*)?\n)+)", page, re.M)
    code = textwrap.dedent(block)
    real = config_module.configure
    monkeypatch.setattr(config_module, "configure", lambda **options: real(**{**options, **SHORT}))
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "docs/experiments.rst", "exec"), {})
    for folder in ("py-bgformer", "py-bgformer-lam0.5", "py-bgformer-lam1"):
        assert any(r.get("final") for r in read_metrics(tmp_path / "runs" / folder)), folder


def test_run_refuses_a_bad_configuration_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="classes_per_batch=41 exceeds the 40 training classes"):
        run(configure(classes_per_batch=41, out=str(tmp_path / "run"), **SHORT))
    assert not (tmp_path / "run" / "last.pt").exists()


#: A BGFormer run whose graph term weighs 0 (α = 1), with its demo settings otherwise.
CONTROL = {"method": "bgformer", "alpha": 1.0, "lam": 1.0}


def control_configs(tmp_path, with_unprojected: bool = True, **options) -> dict[str, object]:
    """Plain and its BGFormer control (with and without a graph-side projection), one short
    augmented demo epoch each: the same seed, data and test-time network."""
    common = {**SHORT, "no_augment": False, "threads": 1, "select_on": "last", **options}
    methods = {"plain": {"method": "plain"}, "control": CONTROL,
               "projected": {**CONTROL, "graph_dim": 16, "graph_heads": 4}}
    if not with_unprojected:  # the method's own tests train it several steps
        del methods["control"]
    return {name: configure(out=str(tmp_path / name), **common, **method)
            for name, method in methods.items()}


def test_adding_the_graph_module_changes_no_initial_weight_nor_batch(tmp_path):
    configs = control_configs(tmp_path, loss="proxy_anchor")  # the loss has weights too
    before = torch.get_rng_state()
    built = {}
    for name, config in configs.items():
        splits = config_splits(config)
        method, splits = build_run_method(config, splits, torch.device("cpu"))
        generator = torch.Generator().manual_seed(config.seed)
        batches = list(itertools.islice(train_loader(config, splits.train, generator), 3))
        built[name] = method, batches
    assert torch.equal(torch.get_rng_state(), before)  # building drew nothing from it
    plain, plain_batches = built.pop("plain")
    for name, (method, batches) in built.items():
        assert method.graph_parameters()  # it does have a graph module
        for part in ("backbone", "loss_fn"):  # trunk, head and the loss's proxies
            for key, value in getattr(plain, part).state_dict().items():
                assert torch.equal(getattr(method, part).state_dict()[key], value), (name, key)
        for (images, labels), (want_images, want_labels) in zip(batches, plain_batches,
                                                                strict=True):
            assert torch.equal(labels, want_labels) and torch.equal(images, want_images), name


def test_the_control_trains_exactly_the_plain_network(tmp_path, tiny_eval):
    configs = control_configs(tmp_path, with_unprojected=False)
    results = {name: run(config) for name, config in configs.items()}
    plain = load_checkpoint(tmp_path / "plain" / LAST_CHECKPOINT)["model"]
    control = load_checkpoint(tmp_path / "projected" / LAST_CHECKPOINT)["model"]
    assert any(key.startswith("graph_loss.bgformer.lin_in.") for key in control)
    test_network = [key for key in plain if key.startswith("backbone.")]
    assert test_network == [key for key in control if key.startswith("backbone.")]
    for key in test_network:
        assert torch.equal(control[key], plain[key]), key
    embedder = build_run_method(configs["plain"], config_splits(configs["plain"]),
                                torch.device("cpu"))[0].eval()
    images = DigitsDemo("test").images[:64]
    embeddings = []
    for model in (plain, {**plain, **{key: control[key] for key in test_network}}):
        embedder.load_state_dict(model)
        with torch.no_grad():
            embeddings.append(embedder.embed(images))
    assert torch.equal(*embeddings)
    assert results["projected"].test_metrics == results["plain"].test_metrics
