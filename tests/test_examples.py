"""The small examples run end to end."""

import importlib.util
import math
import re
import subprocess
import sys
from pathlib import Path

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
