"""``--threads``: the CPU thread count of ``bgf-train`` and the commands built on it — its
default, its validation, where a run records it, and that a resumed run may change it."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
from pathlib import Path

import pytest
import torch

from bgf_pyg import options
from bgf_pyg.checks import InputError
from bgf_pyg.cli import main, parse_args
from bgf_pyg.config import EXECUTION_OPTIONS
from bgf_pyg.eval_cli import build_eval_parser
from bgf_pyg.eval_cli import main as eval_main
from bgf_pyg.experiment import use_threads
from bgf_pyg.options import auto_threads
from bgf_pyg.run_folder import check_config, load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
#: A tiny demo run: one epoch of 5 batches, 16-d, no augmentation, no validation split.
TINY = ["--method", "plain", "--epochs", "1", "--embedding-dim", "16", "--samples-per-class",
        "36", "--select-on", "last", "--device", "cpu", "--no-augment", "--no-progress"]


@pytest.fixture
def keep_threads():
    """Put torch's thread count back after a test that changes it (later tests run on 1)."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("environ,cpus,expected", [
    ({"OMP_NUM_THREADS": "3"}, 16, 3),  # the environment's per-process count wins
    ({"OMP_NUM_THREADS": "4,2"}, 16, 4),  # nested levels: the outer one
    ({"OMP_NUM_THREADS": "3", "LOCAL_WORLD_SIZE": "4"}, 16, 3),  # already per process
    ({}, 8, 4),  # half the usable CPUs
    ({}, 1, 1),
    ({}, 3, 1),
    ({"OMP_NUM_THREADS": ""}, 8, 4),  # set but empty, zero or not a count: ignored
    ({"OMP_NUM_THREADS": "0"}, 8, 4),
    ({"OMP_NUM_THREADS": "many"}, 8, 4),
    ({"LOCAL_WORLD_SIZE": "2"}, 16, 4),  # torchrun: half the CPUs shared by the node's ranks
    ({"LOCAL_WORLD_SIZE": "16"}, 16, 1),
    ({"LOCAL_WORLD_SIZE": "x"}, 16, 8),
])
def test_auto_threads(environ, cpus, expected):
    assert auto_threads(environ, cpus) == expected


def test_auto_threads_counts_the_cpus_this_process_may_use(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(options.os, "sched_getaffinity", lambda pid: {0, 2, 5, 7, 9, 11},
                        raising=False)
    monkeypatch.setattr(options.os, "cpu_count", lambda: 64)  # the machine: not what counts
    assert auto_threads() == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    assert auto_threads() == 5


def test_the_default_is_the_auto_count_and_help_shows_it(monkeypatch, capsys):
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    assert parse_args([]).threads == 7
    assert build_eval_parser().parse_args(["run"]).threads == 7
    assert parse_args(["--threads", "2"]).threads == 2
    assert main(["--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 7, the auto count here)" in text
    assert "OMP_NUM_THREADS when set, else half the CPUs" in text


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "1.5", "auto"])
def test_bad_thread_counts_are_one_line_and_exit_2(value, capsys):
    assert main(["--threads", value]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"bgf-train: error: argument --threads: expected an integer >= 1, got "
                   f"{value!r}"]
    with pytest.raises(SystemExit) as exit_:
        build_eval_parser().parse_args(["run", "--threads", value])
    assert exit_.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_use_threads_sets_torch(keep_threads):
    use_threads(2)
    assert torch.get_num_threads() == 2
    use_threads(1)  # the inter-op pool may be running by now: no error either way
    assert torch.get_num_threads() == 1


def test_a_run_records_its_threads_and_resumes_with_another_count(tmp_path, keep_threads):
    with contextlib.redirect_stdout(io.StringIO()):
        assert main([*TINY, "--threads", "1", "--out", str(tmp_path)]) == 0
    header = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert header["config"]["threads"] == 1
    assert load_checkpoint(tmp_path / "last.pt")["config"]["threads"] == 1
    with contextlib.redirect_stdout(io.StringIO()):  # the math is the same: accepted
        assert main([*TINY, "--threads", "2", "--epochs", "2", "--resume",
                     "--out", str(tmp_path)]) == 0
    assert torch.get_num_threads() == 2
    last = load_checkpoint(tmp_path / "last.pt")
    assert last["epoch"] == 2 and last["config"]["threads"] == 2
    # bgf-eval runs on its own --threads, not the run's
    with contextlib.redirect_stdout(io.StringIO()):
        assert eval_main([str(tmp_path), "--device", "cpu", "--threads", "1"]) == 0
    assert torch.get_num_threads() == 1


def test_the_thread_count_is_not_compared_on_resume():
    saved = {"--lr": 0.1, "threads": 2}
    check_config(saved, {"--lr": 0.1, "threads": 1}, "last.pt", EXECUTION_OPTIONS)
    with pytest.raises(InputError, match="--lr"):
        check_config(saved, {"--lr": 0.2, "threads": 2}, "last.pt", EXECUTION_OPTIONS)


def load_script(folder: str, name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_scripts_pass_threads_to_bgf_train(tmp_path):
    cub = load_script("examples", "cub")
    args, rest = cub.parse(["--threads", "3"])
    assert cub.run_config(args, rest, "plain", 0, single=True).threads == 3
    robustness = load_script("benchmarks", "robustness")
    args = robustness.parse(["--threads", "3", "--runs", str(tmp_path)])
    assert robustness.run_config(args, "intra-batch", "clean", 0.0, 0).threads == 3
    emoji = load_script("benchmarks", "emoji_pretrained")
    args = emoji.parse(["--data-root", str(tmp_path), "--threads", "3", "--runs", str(tmp_path)])
    assert emoji.run_options(args, "proxygml", 0)["threads"] == 3  # its extra may be absent


def test_bgf_sweep_passes_threads_to_every_run():
    from bgf_pyg.sweep import build_parser as build_sweep_parser
    from bgf_pyg.sweep import split_argv, trial_config

    _, base = split_argv(build_sweep_parser(),
                         ["--name", "t", "--grid", "lr=1e-3,3e-4", "--", "--threads", "3"])
    assert trial_config(parse_args(base), {"lr": "3e-4"}, 1, Path("out")).threads == 3
