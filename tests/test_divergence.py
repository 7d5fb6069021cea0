"""A diverging run is its own error (``DivergenceError``, an ``ArithmeticError``), not a bad input;
the command lines still report it in one line with exit code 2."""

from __future__ import annotations

import pytest

from bgf_pyg import cli, eval_cli
from bgf_pyg.checks import InputError
from bgf_pyg.train import DivergenceError

MESSAGE = "epoch 1: training diverged at step 2 (learning rate 1e+30): the loss is nan"


def diverge(*args, **kwargs):
    raise DivergenceError(MESSAGE)


def test_divergence_is_no_input_error():
    err = DivergenceError(MESSAGE)
    assert isinstance(err, ArithmeticError)
    assert not isinstance(err, InputError | ValueError | RuntimeError)


@pytest.mark.parametrize("method,options", [
    ("plain", "--lr 0.001"),
    ("proxygml", "--lr 0.001, --proxy-lr 0.1"),
    ("intra-batch", "--lr 0.001, --temperature 0.2"),
])
def test_bgf_train_reports_divergence_in_one_line_with_exit_code_2(monkeypatch, capsys, method,
                                                                   options):
    monkeypatch.setattr(cli, "run", diverge)
    assert cli.main(["--method", method]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        f"bgf-train: error: {MESSAGE}; the options that set this run's step size and logit "
        f"scale are {options} (a smaller learning rate usually fixes it)")


def test_bgf_eval_reports_divergence_in_one_line_with_exit_code_2(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(eval_cli, "evaluate_run", diverge)
    assert eval_cli.main([str(tmp_path), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == f"bgf-eval: error: {MESSAGE}"
