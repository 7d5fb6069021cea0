"""The small examples run end to end."""

import importlib.util
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
