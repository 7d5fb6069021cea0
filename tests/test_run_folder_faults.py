"""Fault injection on finished run folders: moved to another path (``bgf-eval`` and
``--resume`` there), or with the configuration stored in a checkpoint edited by hand."""

from __future__ import annotations

import shutil

import pytest
import torch

from bgf_pyg.eval_cli import main as eval_main
from bgf_pyg.run_folder import BEST_CHECKPOINT, LAST_CHECKPOINT, read_metrics
from tests import test_run_folder
from tests.test_run_folder import last_error, train

#: A finished one-epoch run and a copy of it per test (fixtures of test_run_folder).
finished_run, run_copy = test_run_folder.finished_run, test_run_folder.run_copy


def test_a_moved_run_evaluates_and_resumes_where_it_is(run_copy, tmp_path, capsys):
    """Nothing in a run folder records its own path: after a move, bgf-eval reads the moved
    weights (the same table as before the move) and --resume continues there."""
    assert eval_main([str(run_copy)]) == 0
    before = capsys.readouterr().out
    moved = tmp_path / "elsewhere" / "renamed"
    moved.parent.mkdir()
    shutil.move(run_copy, moved)
    assert eval_main([str(moved)]) == 0
    after = capsys.readouterr().out
    assert f"weights: {moved / BEST_CHECKPOINT}" in after
    assert after.replace(str(moved), str(run_copy)) == before
    assert train(moved, "--epochs", "2", "--resume") == 0
    assert "resumed from" in capsys.readouterr().err
    assert [r["epoch"] for r in read_metrics(moved) if r.get("split") == "val"] == [1, 2]


def edit_stored_config(checkpoint, change):
    state = torch.load(checkpoint, weights_only=False)
    state["config"] = None if change is None else {**state["config"], **change}
    torch.save(state, checkpoint)


@pytest.mark.parametrize("change,fragment", [
    ({"--lr": "abc"}, "its stored configuration: lr must be a number (float), got str 'abc'"),
    ({"--method": "nope"}, "its stored configuration: method must be one of"),
    ({"--embedding-dim": 32}, "does not fit the model of its configuration"),
    (None, "holds no configuration (its 'config' is NoneType None)"),
])
def test_bgf_eval_names_the_checkpoint_whose_configuration_was_edited(run_copy, capsys, change,
                                                                      fragment):
    checkpoint = run_copy / BEST_CHECKPOINT
    edit_stored_config(checkpoint, change)
    assert eval_main([str(run_copy)]) == 2
    error = last_error(capsys)
    assert error.startswith(f"bgf-eval: error: {checkpoint}") and fragment in error


def test_resume_names_the_option_edited_in_the_checkpoint(run_copy, capsys):
    edit_stored_config(run_copy / LAST_CHECKPOINT, {"--lr": "abc"})
    assert train(run_copy, "--epochs", "2", "--resume") == 2
    assert "--lr 0.001 now, abc in the checkpoint" in last_error(capsys)


@pytest.mark.parametrize("checkpoint", [BEST_CHECKPOINT, LAST_CHECKPOINT])
def test_a_checkpoint_cut_short_is_named_by_eval_and_resume(run_copy, capsys, checkpoint):
    path = run_copy / checkpoint
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
    if checkpoint == BEST_CHECKPOINT:
        assert eval_main([str(run_copy)]) == 2
    else:
        assert train(run_copy, "--epochs", "2", "--resume") == 2
    assert f"could not read checkpoint {path}" in last_error(capsys)
