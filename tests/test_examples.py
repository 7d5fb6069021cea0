"""The small examples run end to end."""

import importlib.util
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_karate_club_learns_the_communities(capsys):
    accuracy = load_example("karate_club").main(["--epochs", "200", "--seed", "0"])
    assert accuracy >= 0.7  # 4 communities: chance is 0.25
    assert "BatchGraphConv(34, 8, heads=4)" in capsys.readouterr().out


def test_pml_loop_trains_with_bgformer_in_a_plain_loop():
    """The PML example as a user runs it: a fresh interpreter, a couple of short epochs."""
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "pml_loop.py"), "--epochs", "2",
         "--batches-per-epoch", "3"],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 0, result.stderr
    losses = [float(m) for m in re.findall(r"epoch \d+: loss ([\d.]+)", result.stdout)]
    assert len(losses) == 2 and all(math.isfinite(v) and v > 0 for v in losses)
    assert re.search(r"after 2 epochs .*test R@1 0\.\d{3}", result.stdout)
#: A tiny demo run of examples/cub.py (16-d, one epoch of 5 batches of 180, no augmentation).
TINY = ["--embedding-dim", "16", "--epochs", "1", "--device", "cpu", "--no-progress",
        "--no-augment", "--samples-per-class", "36", "--batch-size", "180"]


def test_cub_example_honours_out(tmp_path):
    cub = load_example("cub")
    options, rest = cub.parse(["--method", "plain", "--out", str(tmp_path / "mine")])
    config = cub.run_config(options, rest, "plain", 0, single=True)
    assert config.out == str(tmp_path / "mine")
    options, rest = cub.parse(["--method", "all", "--out", str(tmp_path), *TINY])
    config = cub.run_config(options, rest, "plain", 1, single=False, methods=cub.METHODS)
    assert config.out == str(tmp_path / "plain-s1")


def test_method_all_reports_the_finished_and_the_failed(tmp_path, capsys):
    cub = load_example("cub")
    # T = 1e-38 makes the intra-batch loss infinite at its first step; the others train.
    code = cub.main(["--method", "all", "--out", str(tmp_path), "--temperature", "1e-38",
                     "--k", "3", *TINY])
    captured = capsys.readouterr()
    assert code == 2
    rows = [line.split("|")[1].strip() for line in captured.out.splitlines()
            if line.startswith("| ") and "method" not in line]
    assert rows == ["raw pixels", "plain", "bgformer", "proxygml"]
    assert "BGFormer − plain, test R@1 in points, paired by seed (same loss" in captured.out
    failures = [line for line in captured.err.splitlines() if line.startswith("cub.py: error:")]
    assert len(failures) == 1
    assert "intra-batch (seed 0)" in failures[0] and "--temperature 1e-38" in failures[0]
    assert "Traceback" not in captured.err
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "bgformer-s0", "intra-batch-s0", "plain-s0", "proxygml-s0"]


def test_paired_line_differences_by_seed():
    from types import SimpleNamespace

    cub = load_example("cub")
    bgformer = {0: {"recall@1": 0.80}, 1: {"recall@1": 0.70}, 2: {"recall@1": 0.66}}
    plain = {0: {"recall@1": 0.75}, 1: {"recall@1": 0.72}}  # seed 2 failed: not paired
    plan = {(m, s): SimpleNamespace(loss="multi_similarity") for m in ("bgformer", "plain")
            for s in range(3)}
    line = cub.paired_line(bgformer, plain, plan, 0)
    assert "same loss (multi_similarity)" in line
    assert "seed 0: +5.0, seed 1: -2.0;" in line and "seed 2" not in line
    assert "mean +1.5 ± 4.9, BGFormer ahead on 1 of 2 seeds" in line  # std of (5, -2): 4.95
    plan["plain", 0] = SimpleNamespace(loss="pce")
    assert "different losses: bgformer multi_similarity, plain pce" in cub.paired_line(
        bgformer, plain, plan, 0)


def test_cub_example_checks_every_run_before_the_first(tmp_path, capsys):
    cub = load_example("cub")
    with_bad = ["--method", "all", "--out", str(tmp_path), "--lr", "-1", *TINY]
    with pytest.raises(SystemExit) as exit_info:
        cub.main(with_bad)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == (
        "cub.py: error: argument --lr: expected a finite number > 0, got '-1'")
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("methods,crossover", [(["bgc_sparse", "bgc_dense"], True),
                                               (["bgc_sparse", "gemm_floor"], False)])
def test_sparse_vs_dense_benchmark_prints_no_none_and_no_jit_warning(tmp_path, methods,
                                                                     crossover):
    """A tiny grid: the crossover line only where both paths ran, never ``None``; PyG's
    import-time ``torch.jit.script`` deprecation stays silent."""
    script = EXAMPLES.parent / "benchmarks" / "sparse_vs_dense.py"
    result = subprocess.run(
        [sys.executable, str(script), "--n", "32", "64", "--k", "4", "--repeats", "1",
         "--warmup", "0", "--no-compile", "--threads", "1", "--methods", *methods,
         "--out", str(tmp_path / "bench.json")],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "jit.script" not in result.stderr and "None" not in result.stdout
    assert ("crossover, k=4: " in result.stdout) == crossover
