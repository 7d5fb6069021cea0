"""Checkpoints store their options by field name (``lr_milestones``); those written before kept
them under the command line's flags (``--lr-milestones``) and still evaluate and resume."""

from __future__ import annotations

import pytest
import torch

from bgf_pyg.cli import main
from bgf_pyg.config import OPTIONS, RESUMABLE, checkpoint_config, configure, from_checkpoint
from bgf_pyg.eval_cli import main as eval_main
from bgf_pyg.run_folder import (
    BEST_CHECKPOINT,
    LAST_CHECKPOINT,
    load_checkpoint,
    read_metrics,
    with_field_names,
)

from .test_run_folder import TINY


def flag_keyed(stored: dict) -> dict:
    """A checkpoint's ``config`` as versions before field names wrote it: every option a resumed
    run must share under its flag; the keys the run adds (``val_class_ids``, ``threads``,
    ``data_root``, ``feature_cache``) as they are."""
    return {f"--{key.replace('_', '-')}" if key in OPTIONS and key not in RESUMABLE else key: value
            for key, value in stored.items()}


def test_older_keys_are_read_as_field_names():
    stored = {"--lr-milestones": [3], "--lr": 0.01, "val_class_ids": [1, 2], "threads": 2}
    assert with_field_names(stored) == {"lr_milestones": [3], "lr": 0.01,
                                        "val_class_ids": [1, 2], "threads": 2}


def test_a_checkpoint_stores_field_names_and_an_older_one_gives_the_same_configuration():
    config = configure(method="plain", lr=0.01, lr_milestones=[3], epochs=5, seed=4)
    stored = checkpoint_config(config)
    assert "lr_milestones" in stored and not any(key.startswith("-") for key in stored)
    older = flag_keyed(stored)
    assert "--lr-milestones" in older and "lr_milestones" not in older
    assert from_checkpoint(with_field_names(older)) == from_checkpoint(stored)
    assert checkpoint_config(from_checkpoint(stored)) == stored


@pytest.fixture
def older_run(tmp_path):
    """A finished one-epoch run whose checkpoints were rewritten as older versions wrote them."""
    out = tmp_path / "run"
    assert main([*TINY, "--out", str(out), "--epochs", "1"]) == 0
    for name in (LAST_CHECKPOINT, BEST_CHECKPOINT):
        state = torch.load(out / name, weights_only=True)
        assert "lr" in state["config"]  # written by field name
        state["config"] = flag_keyed(state["config"])
        torch.save(state, out / name)
    assert "--lr" in torch.load(out / LAST_CHECKPOINT, weights_only=True)["config"]
    return out


def test_an_older_checkpoint_evaluates_and_resumes(older_run, capsys):
    assert load_checkpoint(older_run / LAST_CHECKPOINT)["config"]["lr"] == 0.001
    assert eval_main([str(older_run), "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    final = next(r for r in read_metrics(older_run) if r.get("final"))
    # the same model, data and weights as the run: its test R@1, first in the test table
    assert "Traceback" not in err
    assert f"| plain, refine none | {100 * final['recall@1']:.1f} |" in out.split("Validation")[0]
    # the options are still compared on resume, and named as options
    assert main([*TINY, "--out", str(older_run), "--epochs", "2", "--resume", "--lr",
                 "0.01"]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("bgf-train: error: ")
    assert "--lr 0.01 now, 0.001 in the checkpoint" in line
    assert main([*TINY, "--out", str(older_run), "--epochs", "2", "--resume"]) == 0
    assert [r["epoch"] for r in read_metrics(older_run) if not r.get("final")] == [1, 2]
    assert "lr" in torch.load(older_run / LAST_CHECKPOINT, weights_only=True)["config"]
