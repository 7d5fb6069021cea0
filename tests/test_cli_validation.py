"""Every ``bgf-train`` option is validated before any work starts: one line naming the option,
exit code 2, no traceback. The numeric options are enumerated from the parser itself, so an option
added later is covered as soon as it declares its domain (``bgf_pyg.options``)."""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bgf_pyg.arguments import HelpFormatter, option_name
from bgf_pyg.cli import build_parser, main, parse_args
from bgf_pyg.config import DEMO_DEFAULTS, DEMO_METHOD_DEFAULTS, SCOPES, demo_defaults
from bgf_pyg.models import METHODS
from bgf_pyg.options import Number

ROOT = Path(__file__).resolve().parents[1]
BAD_NUMBERS = ("0", "-1", "nan", "inf", "-inf")


def numeric_actions() -> list[argparse.Action]:
    return [a for a in build_parser()._actions if isinstance(a.type, Number)]


def in_declared_domain(number: Number, value: float) -> bool:
    """The declared interval, restated: finite, within [low, high] with open ends excluded."""
    if math.isnan(value) or math.isinf(value):
        return False
    above = number.low is None or value > number.low or (value == number.low
                                                         and not number.low_open)
    below = number.high is None or value < number.high or (value == number.high
                                                           and not number.high_open)
    return above and below


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("bgf-train: error:")
    for fragment in fragments:
        assert fragment in lines[0]


def test_numeric_options_declare_their_domain():
    raw = [a.option_strings[0] for a in build_parser()._actions if a.type in (int, float)]
    assert raw == [], f"declare a bgf_pyg.options.Number domain for {raw}"
    assert len(numeric_actions()) >= 20


@pytest.mark.parametrize("action", numeric_actions(), ids=lambda a: a.option_strings[0])
def test_every_numeric_option_rejects_zero_negative_nan_inf(action, capsys):
    option = action.option_strings[0]
    for text in BAD_NUMBERS:
        if in_declared_domain(action.type, float(text)):  # e.g. --seed 0, --weight-decay 0
            assert action.type(text) == float(text)
            continue
        code = main([option, text])
        assert_one_line_error(code, capsys.readouterr().err, option)


def test_a_real_process_reports_one_line():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "bgf_pyg.cli", "--lr", "nan"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert_one_line_error(done.returncode, done.stderr,
                          "argument --lr: expected a finite number > 0, got 'nan'")
    assert done.stdout == ""


@pytest.mark.parametrize("argv,fragments", [
    (["--proxies-per-class", "3"], ["--proxies-per-class has no effect", "--method bgformer",
                                    "--method proxygml"]),
    (["--method", "proxygml", "--k", "5"], ["--k has no effect", "--method bgformer"]),
    (["--method", "plain", "--temperature", "0.1"], ["--temperature", "intra-batch"]),
    (["--data-root", "/data"], ["--data-root has no effect", "--dataset demo"]),
    (["--check-images", "decode"], ["--check-images has no effect"]),
    (["--pretrained", "r50.pth"], ["--pretrained has no effect", "--backbone smallcnn"]),
    (["--vit-pooling", "cls+mean"], ["--vit-pooling has no effect", "--backbone smallcnn"]),
    (["--batch-size", "8"], ["--batch-size has no effect", "--method bgformer"]),
    (["--method", "plain", "--proxy-lr", "0.1"], ["--proxy-lr has no effect", "proxy_anchor"]),
    (["--lr-gamma", "0.5"], ["--lr-gamma has no effect", "--lr-milestones unset"]),
    (["--method", "proxygml", "--loss", "triplet"], ["--loss has no effect"]),
])
def test_options_the_run_ignores_are_refused(argv, fragments, capsys):
    assert_one_line_error(main(argv), capsys.readouterr().err, *fragments)


def test_scoped_options_are_accepted_where_they_apply():
    assert parse_args(["--method", "plain", "--loss", "proxy_anchor", "--proxy-lr", "0.1"])
    assert parse_args(["--lr-milestones", "3", "--lr-gamma", "0.5"]).lr_gamma == 0.5
    # examples/cub.py --method all: an option of one of the methods is fine for all of them.
    assert parse_args(["--method", "proxygml", "--k", "5"], methods=METHODS).k == 5


def test_scope_table_names_real_options():
    dests = {a.dest for a in build_parser()._actions}
    for dest, scopes in SCOPES.items():
        assert dest in dests, dest
        for scope in scopes:
            assert set(scope.constraints) <= dests, (dest, scope)


@pytest.mark.parametrize("argv,fragment", [
    (["--lr-milestones", "5", "3"], "--lr-milestones must be strictly increasing, got 5 3"),
    (["--lr-milestones", "5", "5"], "strictly increasing"),
    (["--epochs", "10", "--lr-milestones", "10"], "--lr-milestones 10 is not below --epochs 10"),
    (["--resume", "--overwrite"], "--resume"),
    (["--device", "foo"], "argument --device: expected cpu, cuda or cuda:N, got 'foo'"),
    (["--device", "cuda:99"], "argument --device"),
    (["--dataset", "sop"], "--data-root is required for --dataset sop"),
    (["--method", "arcface"], "argument --method: invalid choice: 'arcface'"),
    (["--lr"], "argument --lr: expected one argument"),
])
def test_cross_option_rules(argv, fragment, capsys):
    assert_one_line_error(main(argv), capsys.readouterr().err, fragment)


@pytest.mark.parametrize("argv,fragment", [
    (["--method", "proxygml", "--batch-size", "5000"],
     "--batch-size 5000 exceeds the 960 training images"),
    (["--classes-per-batch", "41"], "--classes-per-batch 41 exceeds the 40 training classes"),
])
def test_sampling_options_against_the_data(tmp_path, argv, fragment, capsys):
    code = main([*argv, "--out", str(tmp_path / "run"), "--device", "cpu", "--no-progress"])
    assert_one_line_error(code, capsys.readouterr().err, fragment)
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_absent_devices_are_refused(capsys):
    assert_one_line_error(main(["--device", "cuda"]), capsys.readouterr().err,
                          "CUDA is not available")
    assert_one_line_error(main(["--amp", "--device", "cpu"]), capsys.readouterr().err,
                          "--amp needs a CUDA --device")


def test_help_shows_every_option_with_its_default(capsys):
    parser = build_parser()
    formatter = HelpFormatter("bgf-train")
    for action in parser._actions:
        assert action.help, f"{action.option_strings} has no help text"
        text = formatter._get_help_string(action)
        if action.default is not None and action.default is not False and action.option_strings \
                and action.dest != "help":
            assert "(default: " in text, action.option_strings
    assert main(["--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    for fragment in ("(default: 0.0001)", "classes 1–100 train, 101–200 test",
                     "classes 1–98 train, 99–196 test", "Ebay_train.txt", "Ebay_test.txt",
                     "Eval/list_eval_partition.txt", "CUB_200_2011/", "car_ims/", "--overwrite",
                     "--lr 0.001"):
        assert fragment in out, fragment


def test_no_options_is_the_demo_of_examples_cub():
    args = parse_args([])
    assert args.dataset == "demo" and args.method == "bgformer"
    for dest, value in demo_defaults("bgformer").items():
        assert getattr(args, dest) == value, dest
    for method in METHODS:  # each method's own demo settings, over the shared ones
        parsed = parse_args(["--method", method])
        for dest, value in {**DEMO_DEFAULTS, **DEMO_METHOD_DEFAULTS.get(method, {})}.items():
            assert getattr(parsed, dest) == value, (method, dest)
    assert parse_args(["--lr", "0.01"]).lr == 0.01  # an explicit option beats the demo default
    assert parse_args(["--dataset", "cub", "--data-root", "x"]).backbone == "resnet50"
    from tests.test_examples import load_example

    cub = load_example("cub")
    options, rest = cub.parse([])
    assert cub.run_config(options, rest, "bgformer", 0, single=True) == args


@pytest.mark.parametrize("method,fragments", [
    ("proxygml", ["--lr 1e+30", "--proxy-lr 1e+32"]),
    ("bgformer", ["--lr 1e+30", "outputs stopped being finite"]),  # caught in the batch graph
])
def test_divergence_names_the_learning_rate(tmp_path, capsys, method, fragments):
    code = main(["--method", method, "--lr", "1e30", "--epochs", "1", "--embedding-dim", "16",
                 "--out", str(tmp_path), "--device", "cpu", "--no-progress", "--no-augment"])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert_one_line_error(code, err.splitlines()[-1] + "\n", "training diverged", *fragments)


def test_option_names():
    assert option_name("lr_milestones") == "--lr-milestones"
