"""``bgf-sweep``: one JSON line per run, scores from the validation split, resumable."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from bgf_pyg.arguments import error_message
from bgf_pyg.cli import parse_args
from bgf_pyg.experiment import run
from bgf_pyg.run_folder import LAST_CHECKPOINT, read_metrics

optuna = pytest.importorskip("optuna")
from bgf_pyg import sweep as sweep_module  # noqa: E402  (needs optuna only when run)
from bgf_pyg.sweep import main  # noqa: E402

TINY = ["--", "--method", "plain", "--epochs", "1", "--embedding-dim", "8",
        "--samples-per-class", "60", "--device", "cpu", "--no-augment"]


def test_grid_sweep_scores_on_val_and_resumes_without_training(tmp_path, capsys):
    argv = ["--name", "lr", "--dir", str(tmp_path), "--grid", "lr=1e-3,3e-3,1e-2",
            "--sampler", "random", "--trials", "2", *TINY]
    assert main(argv) == 0
    table = capsys.readouterr().out.strip().splitlines()
    rows = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    assert len({r["params"]["lr"] for r in rows}) == len(rows) == 2
    for row in rows:  # the score is the validation R@1 of the selected epoch, from its run
        records = read_metrics(row["out"])
        final = records[-1]
        assert final["final"] and final["select_on"] == "val"
        val = [r["recall@1"] for r in records
               if r.get("split") == "val" and r["epoch"] == row["selected_epoch"]]
        assert row["val_recall@1"] == val[0]
        assert row["test"]["recall@1"] == final["recall@1"]
    best = max(rows, key=lambda r: r["val_recall@1"])
    assert table[-2].startswith(f"| --lr {best['params']['lr']} | 1 |")  # best val first
    # A killed sweep: its third trial was handed the last setting and left running. The rerun
    # queues that setting again and does not train the two finished runs again.
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    grid = {"lr": ["1e-3", "3e-3", "1e-2"]}
    study = optuna.load_study(study_name="lr", storage=storage,
                              sampler=optuna.samplers.GridSampler(grid, seed=0))
    stale = study.ask()
    stale_lr = stale.suggest_categorical("lr", grid["lr"])
    assert stale_lr not in {r["params"]["lr"] for r in rows}
    mtimes = {r["out"]: (tmp_path / r["out"] / LAST_CHECKPOINT).stat().st_mtime_ns for r in rows}
    argv[argv.index("--trials") + 1] = "3"
    assert main(argv) == 0
    capsys.readouterr()
    trials = optuna.load_study(study_name="lr", storage=storage).trials
    states = optuna.trial.TrialState
    assert [t.state for t in trials] == [states.COMPLETE] * 2 + [states.FAIL, states.COMPLETE]
    assert trials[-1].params == {"lr": stale_lr}
    rows = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    assert sorted(r["params"]["lr"] for r in rows) == sorted(grid["lr"])
    assert all((tmp_path / out / LAST_CHECKPOINT).stat().st_mtime_ns == t
               for out, t in mtimes.items())


def test_random_sampler_draws_distinct_settings(tmp_path, capsys):
    """--trials distinct settings of a finite grid, never one twice (and no more than exist)."""
    argv = ["--name", "r", "--dir", str(tmp_path), "--sampler", "random", "--trials", "5",
            "--grid", "lr=1e-3,3e-3", "--grid", "embedding-dim=4,8", *TINY]
    argv.remove("8")  # TINY's --embedding-dim value: the grid sets it
    argv.remove("--embedding-dim")
    assert main([*argv[:7], "3", *argv[8:]]) == 0
    rows = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    settings = [tuple(sorted(r["params"].items())) for r in rows]
    assert len(settings) == 3 and len(set(settings)) == 3
    assert main(argv) == 0  # 5 asked, 4 exist: the fourth setting is added, then it stops
    rows = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    assert len({tuple(sorted(r["params"].items())) for r in rows}) == len(rows) == 4
    capsys.readouterr()


@pytest.mark.parametrize("argv,fragment", [
    (["--grid", "lr=-1"], "argument --lr: expected a finite number > 0"),
    (["--grid", "seed=1,2"], "--seed is set by bgf-sweep itself"),
    (["--grid", "lr"], "expected NAME=V1,V2"),
    (["--grid", "lr=,"], "expected NAME=V1,V2"),  # an empty list
    (["--grid", "lr=1e-3", "--grid=--lr=3e-4"], "--grid names an option twice"),
    (["--grid", "lr=1e-3,0.001"], "--grid lr: 1e-3 and 0.001 are the same value"),
    (["--grid", "k=5,05", "--", "--method", "bgformer"], "--grid k: 5 and 05 are the same value"),
    (["--grid", "no-augment=true,True"], "--grid no-augment: true and True are the same value"),
    (["--grid", "lr=1e-3,3e-4", "--", "--lr", "0.01"], "--lr is set both by --grid and after --"),
    (["--grid", "epochs=1.5"], "argument --epochs: expected an integer >= 1, got '1.5'"),
    (["--grid", "lr=1e-3", "--", "--select-on", "last"], "chooses on the validation split"),
    (["--grid", "lr=1e-3", "--", "--val-classes", "0"], "--select-on val needs a validation"),
    (["--grid", "detach-graph-input=yes", "--", "--method", "bgformer"],
     "--grid detach-graph-input: an on/off option takes true or false, got ['yes']"),
    (["--grid", "detach-graph-input=true", "--", "--method", "plain"],
     "--detach-graph-input has no effect here (--method plain)"),
])
def test_bad_plans_are_refused_before_any_run(tmp_path, capsys, argv, fragment):
    assert main(["--name", "x", "--dir", str(tmp_path / "s"), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0]
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("grid,fragment", [
    ("val-classes=0.2,0.01", "val-classes=0.01: --val-classes 0.01"),
    ("classes-per-batch=4,41", "classes-per-batch=41: --classes-per-batch 41 exceeds the 40 "
                               "training classes"),
])
def test_plans_the_data_cannot_run_are_refused_before_any_run(tmp_path, capsys, grid, fragment):
    """Every combination is checked against the dataset's classes (the demo: 50 training classes,
    40 once a fifth is held out) before the first run starts."""
    assert main(["--name", "x", "--dir", str(tmp_path / "s"), "--grid", grid, *TINY]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("bgf-sweep: error: --grid ") and fragment in err[0]
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("options", [
    ["--classes-per-batch", "41"],  # 40 training classes
    ["--method", "bgformer", "--k", "48"],  # the demo's 8 × 6 batch
    ["--method", "proxygml", "--batch-size", "100000"],
])
def test_a_plan_is_refused_exactly_as_its_run_would_be(tmp_path, capsys, options):
    """bgf-sweep's pre-run checks are the run's: the same refusal, in the same words."""
    config = parse_args([*options, "--out", str(tmp_path / "run"), "--no-progress"])
    with pytest.raises(ValueError) as refused:
        run(config)
    assert not (tmp_path / "run" / LAST_CHECKPOINT).exists()
    argv = ["--name", "x", "--dir", str(tmp_path / "s"), "--grid", "lr=1e-3", "--", *options]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"bgf-sweep: error: --grid lr=1e-3: {error_message(refused.value, config)}"]


def test_the_sweep_reads_no_private_attribute():
    """Optuna's public API only (its private ``study._storage`` and ``trial._trial_id`` may
    change in any release)."""
    tree = ast.parse(Path(sweep_module.__file__).read_text(encoding="utf-8"))
    private = [f"line {node.lineno}: .{node.attr}" for node in ast.walk(tree)
               if isinstance(node, ast.Attribute) and node.attr.startswith("_")
               and not node.attr.startswith("__")]
    assert private == []


def test_on_off_options_take_true_and_false():
    from bgf_pyg.sweep import trial_config, trial_options

    assert trial_options({"detach-graph-input": "true"}) == {"detach_graph_input": True}
    assert trial_options({"detach-graph-input": "False"}) == {"detach_graph_input": False}
    assert trial_options({"tensorboard": "false", "k": "5"}) == {"tensorboard": False, "k": 5}
    assert trial_config(parse_args(["--method", "bgformer"]), {"detach-graph-input": "true"}, 0,
                        Path("o")).detach_graph_input is True


@pytest.mark.parametrize("extra", [["--method", "plain"], ["--seed", "1"], ["--epochs", "1"]])
def test_train_options_before_the_separator_are_an_error(tmp_path, capsys, extra):
    """Without ``--`` the runs would start with options the user did not mean (``--seed`` even
    abbreviated ``--seeds``): bgf-sweep refuses, naming the separator."""
    argv = ["--name", "x", "--dir", str(tmp_path / "s"), "--grid", "lr=1e-3", *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert f"unrecognized arguments: {' '.join(extra)}" in err[0] and "go after --" in err[0]
    assert not (tmp_path / "s").exists()


def test_help_shows_each_default_once_in_plain_text(capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    assert "``" not in text and "(default: None)" not in text
    assert all(line.count("(default:") <= 1 for line in text.splitlines())
    assert "-- [bgf-train options]" in text


def test_options_that_every_setting_completes_are_accepted():
    """``--lr-gamma`` alone needs ``--lr-milestones``, which each setting of the grid gives."""
    from bgf_pyg.sweep import build_parser, check_plan, split_argv

    parser = build_parser()
    args, base = split_argv(parser, ["--name", "x", "--grid", "lr-milestones=5,10", "--",
                                     "--method", "plain", "--lr-gamma", "0.5", "--epochs", "20"])
    assert check_plan(parser, args, base).lr_gamma == 0.5


def test_a_study_rerun_with_another_grid_is_refused_before_any_run(tmp_path, capsys):
    """Optuna cannot change a stored study's values: the second sweep ended in its
    'CategoricalDistribution does not support dynamic value space' after a failed trial."""
    import argparse

    from bgf_pyg.sweep import make_study

    first = argparse.Namespace(name="x", grid=[("lr", ["1e-3", "3e-4"])], sampler_seed=0)
    make_study(first, tmp_path)
    make_study(first, tmp_path)  # the same grid: the study resumes
    assert main(["--name", "x", "--dir", str(tmp_path), "--grid", "lr=1e-2,3e-4", *TINY]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"bgf-sweep: error: {tmp_path} holds study 'x' of another grid "
                   "(--grid lr=1e-3,3e-4); repeat it to resume that study, or give another "
                   "--name or --dir"]
    assert not (tmp_path / "runs.jsonl").exists()
