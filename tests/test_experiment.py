"""bgf_pyg.experiment.run: one configuration in, the trained run's result out; the docs' Python
example (docs/experiments.rst) runs as written (with a shorter training)."""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import pytest

from bgf_pyg import config as config_module
from bgf_pyg.config import configure
from bgf_pyg.experiment import Result, run
from bgf_pyg.run_folder import read_metrics

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
