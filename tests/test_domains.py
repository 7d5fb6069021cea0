"""One vocabulary of values (``bgf_pyg.domains``): the library raises ``ValueError`` (never
argparse's ``ArgumentTypeError``) naming its parameter; the command line prints the same text
after its option, and it alone knows the flags' spelling."""

from __future__ import annotations

import argparse
import ast
import math
from pathlib import Path

import pytest
import torch

from bgf_pyg.arguments import argument_type, field_name, option_name
from bgf_pyg.checks import InputError, error_chain
from bgf_pyg.cli import main
from bgf_pyg.config import OPTIONS, configure
from bgf_pyg.domains import (
    Number,
    device,
    dropout_rate,
    fraction,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    probability,
    seed_int,
    val_classes,
)
from bgf_pyg.models import build_method
from bgf_pyg.models.backbones import build_backbone
from bgf_pyg.options import refinement_list, stage_count
from bgf_pyg.sweep import is_switch
from bgf_pyg.train import Evaluator

from .test_layers import ROOT, module_name, stated_layers

PACKAGE = ROOT / "bgf_pyg"


@pytest.mark.parametrize("domain,value,message", [
    (positive_int, 0, "k must be >= 1, got 0"),
    (non_negative_int, -1, "k must be >= 0, got -1"),
    (seed_int, 2**32, "k must lie in [0, 4294967295], got 4294967296"),
    (stage_count, 10, "k must lie in [1, 9], got 10"),
    (positive_float, 0.0, "k must be a finite number > 0, got 0.0"),
    (positive_float, math.inf, "k must be a finite number > 0, got inf"),
    (non_negative_float, math.nan, "k must be a finite number >= 0, got nan"),
    (probability, 1.5, "k must lie in [0, 1], got 1.5"),
    (fraction, 0, "k must lie in (0, 1], got 0"),
    (dropout_rate, 1.0, "k must lie in [0, 1), got 1.0"),
])
def test_a_value_outside_its_domain_is_a_value_error_naming_the_parameter(domain, value, message):
    with pytest.raises(ValueError) as caught:
        domain.check(value, "k")
    assert str(caught.value) == message


@pytest.mark.parametrize("domain,value,error,message", [
    (positive_int, 2.5, TypeError, "k must be an int >= 1, got float 2.5"),
    (positive_int, True, TypeError, "k must be an int >= 1, got bool True"),
    (stage_count, "3", TypeError, "k must be an int in [1, 9], got str '3'"),
    (positive_float, "1", TypeError, "k must be a float, got str '1'"),
    (probability, False, TypeError, "k must be a float, got bool False"),
])
def test_a_value_of_the_wrong_type_is_a_type_error_naming_the_parameter(domain, value, error,
                                                                         message):
    with pytest.raises(error) as caught:
        domain.check(value, "k")
    assert str(caught.value) == message


def test_a_value_inside_its_domain_is_returned_as_its_kind():
    assert positive_int.check(3, "k") == 3
    assert positive_float.check(2, "t") == 2.0 and isinstance(positive_float.check(2, "t"), float)
    assert probability.check(1, "p") == 1.0 and dropout_rate.check(0, "p") == 0.0
    assert seed_int.check(2**32 - 1, "seed") == 2**32 - 1


#: (domain, text outside it, the message every caller sees)
TEXT_CASES = [
    (positive_int, "0", "expected an integer >= 1, got '0'"),
    (positive_int, "1.5", "expected an integer >= 1, got '1.5'"),
    (seed_int, "-1", "expected an integer in [0, 4294967295], got '-1'"),
    (positive_float, "nan", "expected a finite number > 0, got 'nan'"),
    (probability, "x", "expected a finite number in [0, 1], got 'x'"),
    (fraction, "0", "expected a finite number in (0, 1], got '0'"),
    (val_classes, "1.5", "expected 0, a fraction in (0, 1) or a class count >= 1, got '1.5'"),
    (device, "foo", "expected cpu, cuda or cuda:N, got 'foo'"),
    (refinement_list, "qe,bogus",
     "expected comma-separated names among none, qe, bgformer, got 'qe,bogus'"),
]


@pytest.mark.parametrize("domain,text,message", TEXT_CASES)
def test_text_outside_a_domain_is_a_value_error_and_on_a_command_line_the_same_text(
        domain, text, message):
    with pytest.raises(ValueError) as caught:
        domain(text)
    assert str(caught.value) == message
    with pytest.raises(argparse.ArgumentTypeError) as caught:
        argument_type(domain)(text)
    assert str(caught.value) == message


def test_argument_types_convert_as_their_domain():
    assert argument_type(positive_int)("3") == 3
    assert argument_type(val_classes)("0.2") == 0.2
    assert argument_type(refinement_list)("qe, qe,none") == ["qe", "none"]
    assert argument_type(device)("cpu") == "cpu"
    number = argument_type(probability)
    assert isinstance(number, Number)  # its interval stays readable off the parser
    assert (number.low, number.high, number.low_open, number.high_open) == (0, 1, False, False)


#: A value outside each parser of text an option declares: as text, and in Python.
BAD_TEXT = {val_classes: ("1.5", 1.5), device: ("foo", "foo"), refinement_list: ("bogus",
                                                                                  ["bogus"])}


def bad_value(name: str) -> tuple[object, list[str]]:
    """A value of option ``name`` outside its domain: in Python, and as command-line text."""
    spec = OPTIONS[name]
    domain = spec.domain
    if isinstance(domain, Number):
        bound = int(domain.low) - 1 if domain.low is not None else int(domain.high) + 1
        text = "nan" if domain.kind is float else str(bound)
        value = domain.kind(text)
    else:
        text, value = BAD_TEXT[domain]
    if spec.nargs is None:
        return value, [text]
    count = spec.nargs if isinstance(spec.nargs, int) else 1
    return [value] * count, [text] * count


DOMAIN_OPTIONS = sorted(name for name, spec in OPTIONS.items() if spec.domain is not None)


@pytest.mark.parametrize("name", DOMAIN_OPTIONS)
def test_every_option_is_refused_by_a_value_error_in_python_and_the_same_text_on_the_cli(
        name, capsys):
    value, argv = bad_value(name)
    with pytest.raises(InputError) as caught:
        configure(**{name: value})
    chain = list(error_chain(caught.value))
    assert not any(isinstance(e, argparse.ArgumentTypeError) for e in chain)
    cause = caught.value.__cause__
    assert isinstance(cause, ValueError)
    assert str(caught.value) == f"{name}: {cause}"
    assert main([option_name(name), *argv]) == 2
    assert capsys.readouterr().err == (
        f"bgf-train: error: argument {option_name(name)}: {cause}\n")


def test_the_option_tests_cover_every_kind_of_domain():
    assert len(DOMAIN_OPTIONS) >= 40
    assert {type(OPTIONS[n].domain) for n in DOMAIN_OPTIONS} >= {Number}
    assert {OPTIONS[n].domain for n in DOMAIN_OPTIONS} >= {val_classes, device, refinement_list}


def imports_argparse(path: Path) -> bool:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return any(isinstance(n, ast.Import) and any(a.name == "argparse" for a in n.names)
               or isinstance(n, ast.ImportFrom) and n.module == "argparse"
               for n in ast.walk(tree))


def test_only_the_command_line_layer_knows_argparse():
    """The library cannot raise argparse's errors: no module below the command-line layer (the
    top row of docs/design.rst §18) imports argparse."""
    layers = stated_layers((ROOT / "docs" / "design.rst").read_text(encoding="utf-8"))
    top = max(layers.values())
    users = sorted(module_name(p, PACKAGE) for p in PACKAGE.rglob("*.py") if imports_argparse(p))
    assert users and all(layers[m] == top for m in users), users


def test_the_flag_of_a_field_and_back():
    for name in OPTIONS:
        assert field_name(option_name(name)) == name
    assert field_name("lr-milestones") == field_name("--lr-milestones") == "lr_milestones"
    assert is_switch("detach-graph-input") and is_switch("--amp")
    assert not is_switch("lr-milestones") and not is_switch("no-such-option")


def test_messages_name_the_callers_own_parameter():
    method = build_method("plain", build_backbone("smallcnn", 8), 3, loss="multi_similarity")
    with pytest.raises(ValueError, match=r"^every must be >= 1, got 0$"):
        Evaluator(method, torch.device("cpu"), every=0)
    with pytest.raises(InputError, match=r"^eval_every: expected an integer >= 1, got '0'$"):
        configure(eval_every=0)
    with pytest.raises(ValueError, match=r"^labels: every sample of the batch has the same class"
                                         r".*the sampler's classes_per_batch >= 2\)$"):
        method(torch.randn(4, 1, 28, 28), torch.zeros(4, dtype=torch.long))
