"""The typed configuration: one declaration per option, the defaults that apply, --help showing
them, and errors in the caller's vocabulary."""

from __future__ import annotations

import ast
import inspect
import json
import re
from dataclasses import fields
from pathlib import Path

import pytest

from bgf_pyg import defaults
from bgf_pyg.checks import InputError, show_value
from bgf_pyg.cli import build_parser, main, parse_args
from bgf_pyg.config import (
    DEMO_METHOD_DEFAULTS,
    OPTIONS,
    Config,
    configure,
    demo_defaults,
)
from bgf_pyg.graph import build_batch_graph
from bgf_pyg.knn import cosine_topk
from bgf_pyg.losses import BatchGraphLoss, PairwiseCrossEntropyLoss, ProxyGMLLoss
from bgf_pyg.models import METHODS
from bgf_pyg.models.methods import BGFormerMethod, IntraBatchMethod, ProxyGMLMethod
from bgf_pyg.nn import BGFormer, TopKAttention
from bgf_pyg.nn.bgformer import BGFormerLayer, DualSSA

ROOT = Path(__file__).resolve().parents[1]

#: Command lines whose --help defaults are compared with the configuration they resolve to.
COMMAND_LINES = [
    [], *(["--method", m] for m in METHODS),
    ["--dataset", "cub", "--data-root", "cub"],
    ["--dataset", "cub", "--data-root", "cub", "--method", "intra-batch"],
    ["--dataset", "emoji", "--data-root", "emoji", "--method", "plain"],
    ["--dataset", "cub", "--data-root", "cub", "--lr", "0.003"],
    ["--preset", "proxygml-cub", "--data-root", "cub", "--device", "cpu"],
]


def help_defaults(argv: list[str], capsys) -> dict[str, str]:
    """Each option's ``(default: X)`` as ``bgf-train ARGV --help`` prints it."""
    assert main([*argv, "--help"]) == 0
    text = capsys.readouterr().out
    found = {}
    for block in re.split(r"\n  (?=--)", text.split("options:", 1)[1].split("\ndatasets")[0]):
        flag = block.split()[0]
        match = re.search(r"\(default: ([^,)]*)[^)]*\)\s*$", " ".join(block.split()))
        if flag.startswith("--") and match:
            found[flag[2:].replace("-", "_").split(",")[0]] = match.group(1)
    return found


@pytest.mark.parametrize("argv", COMMAND_LINES, ids=lambda a: " ".join(a) or "no options")
def test_help_shows_the_default_the_run_records(argv, capsys):
    """For every option, the default ``--help`` prints is the value the run resolves (and
    records in ``metrics.jsonl``): the demo's with no options, the method's, the dataset's, a
    preset's, a derived one (``--proxy-lr`` follows ``--lr``)."""
    shown = help_defaults(argv, capsys)
    config = parse_args(argv)
    capsys.readouterr()
    valued = {name for name in OPTIONS if getattr(config, name) not in (None, False)}
    assert valued - {"preset"} <= set(shown), valued - set(shown)
    for name in valued - {"preset"}:  # an unset option says its default in words
        assert shown[name] == show_value(getattr(config, name)), name


def test_help_follows_the_method_and_the_dataset(capsys):
    assert help_defaults([], capsys)["lr"] == "0.001"  # the demo's
    assert help_defaults(["--dataset", "cub", "--data-root", "x"], capsys)["lr"] == "0.0001"
    assert help_defaults(["--method", "intra-batch", "--dataset", "cub", "--data-root", "x"],
                         capsys)["graph_layers"] == "1"
    assert help_defaults(["--method", "bgformer", "--dataset", "cub", "--data-root", "x"],
                         capsys)["graph_layers"] == "2"
    assert help_defaults(["--lr", "0.003"], capsys)["proxy_lr"] == "0.3"


def test_a_run_records_the_resolved_configuration(tmp_path, capsys, tiny_eval):
    argv = ["--method", "plain", "--embedding-dim", "8", "--samples-per-class", "60",
            "--epochs", "1", "--device", "cpu", "--no-progress", "--no-augment",
            "--out", str(tmp_path)]
    assert main(argv) == 0
    header = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])["config"]
    expected = json.loads(json.dumps(parse_args(argv).options()))
    assert {k: v for k, v in header.items() if k != "val_class_ids"} == expected


def test_every_option_is_declared_once_with_help_and_domain():
    for f in fields(Config):
        if f.name == "given":
            continue
        spec = f.metadata["option"]
        assert spec.help, f.name
        if isinstance(f.default, int | float) and not isinstance(f.default, bool):
            assert spec.domain is not None, f"{f.name}: a number needs a declared domain"
    parser_dests = {a.dest for a in build_parser()._actions} - {"help", "list_presets"}
    assert parser_dests == set(OPTIONS)


def test_configure_resolves_the_demo_and_the_method():
    config = configure()
    for name, value in demo_defaults("bgformer").items():
        assert getattr(config, name) == value, name
    plain = config.replace(method="plain")
    assert plain.method == "plain" and plain.graph_layers is None  # no graph module
    assert plain.out == "runs/demo-plain-s0"
    assert config.replace(seed=3).out == "runs/demo-bgformer-s3"
    intra = configure(method="intra-batch", dataset="cub", data_root="x")
    assert (intra.graph_layers, intra.graph_heads, intra.pooling) == (1, 2, "max")
    assert configure(lr=0.01).proxy_lr == pytest.approx(1.0)
    assert configure(out="mine").replace(seed=1).out == "mine"  # a given option is kept


def test_configure_errors_name_the_field():
    with pytest.raises(InputError, match=r"^k has no effect here \(method plain\); it applies "
                                         r"to method bgformer$"):
        configure(method="plain", k=5)
    with pytest.raises(InputError, match=r"^lr: expected a finite number > 0, got '-1'"):
        configure(lr=-1)
    with pytest.raises(InputError, match="lr_milestones must be strictly increasing"):
        configure(lr_milestones=[5, 3])
    with pytest.raises(InputError, match="epochs must be an int"):
        configure(epochs=2.5)
    with pytest.raises(InputError, match="unknown option.*'learning_rate'"):
        configure(learning_rate=0.1)
    with pytest.raises(InputError, match="data_root is required for dataset cub"):
        configure(dataset="cub")


#: (callable, parameter, the shared default it must have)
SHARED = [
    (build_batch_graph, "k", defaults.K), (cosine_topk, "k", defaults.K),
    (BatchGraphLoss, "k", defaults.K), (BGFormerMethod, "k", defaults.K),
    (BGFormer, "k", defaults.K), (DualSSA, "k", defaults.K),
    (TopKAttention, "k", defaults.K),
    (BatchGraphLoss, "alpha", defaults.ALPHA), (BGFormerMethod, "alpha", defaults.ALPHA),
    (BGFormer, "lam", defaults.LAM), (BGFormerLayer, "lam", defaults.LAM),
    (DualSSA, "lam", defaults.LAM), (BGFormerMethod, "lam", defaults.LAM),
    (IntraBatchMethod, "temperature", defaults.TEMPERATURE),
    (PairwiseCrossEntropyLoss, "temperature", defaults.TEMPERATURE),
    (ProxyGMLLoss, "proxies_per_class", defaults.PROXIES_PER_CLASS),
    (ProxyGMLMethod, "proxies_per_class", defaults.PROXIES_PER_CLASS),
    (ProxyGMLLoss, "r", defaults.PROXYGML_R), (ProxyGMLMethod, "r", defaults.PROXYGML_R),
    (ProxyGMLLoss, "weight_lambda", defaults.PROXYGML_LAMBDA),
    (ProxyGMLMethod, "weight_lambda", defaults.PROXYGML_LAMBDA),
]


@pytest.mark.parametrize("target,parameter,value", SHARED,
                         ids=lambda x: getattr(x, "__name__", str(x)))
def test_shared_hyperparameters_have_one_default(target, parameter, value):
    assert inspect.signature(target).parameters[parameter].default == value


def test_the_configuration_uses_the_shared_defaults():
    fields_by_name = {f.name: f.default for f in fields(Config)}
    assert fields_by_name["k"] == defaults.K and fields_by_name["alpha"] == defaults.ALPHA
    assert fields_by_name["lam"] == defaults.LAM
    assert fields_by_name["temperature"] == defaults.TEMPERATURE
    assert fields_by_name["proxies_per_class"] == defaults.PROXIES_PER_CLASS
    assert fields_by_name["proxygml_r"] == defaults.PROXYGML_R
    assert fields_by_name["proxygml_lambda"] == defaults.PROXYGML_LAMBDA
    # the demo's own settings are data over the configuration, each a real option
    for settings in [demo_defaults(m) for m in METHODS] + list(DEMO_METHOD_DEFAULTS.values()):
        assert set(settings) <= set(OPTIONS)


def imports_the_cli(path: Path) -> bool:
    """Whether ``path`` imports ``bgf_pyg.cli`` (absolutely or relatively, as a module or from)."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import) and any(a.name == "bgf_pyg.cli" for a in node.names):
            return True
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if module == "cli" or module.endswith(".cli"):
                return True
            if module in ("bgf_pyg", "") and any(a.name == "cli" for a in node.names):
                return True
    return False


def test_only_the_command_line_imports_the_cli():
    """``bgf_pyg.cli`` is an entry point: the library, the other commands, the examples and
    the benchmarks use :mod:`bgf_pyg.config` and :mod:`bgf_pyg.experiment`."""
    paths = [*(ROOT / "bgf_pyg").rglob("*.py"), *(ROOT / "examples").glob("*.py"),
             *(ROOT / "benchmarks").glob("*.py")]
    assert len(paths) > 40
    importers = [p.relative_to(ROOT).as_posix() for p in paths
                 if p.name != "cli.py" and imports_the_cli(p)]
    assert importers == []


def test_the_scan_finds_an_import_of_the_cli(tmp_path):
    for text in ("from bgf_pyg.cli import main", "from . import cli", "from .cli import run",
                 "import bgf_pyg.cli", "from bgf_pyg import cli"):
        (tmp_path / "m.py").write_text(text + "\n")
        assert imports_the_cli(tmp_path / "m.py"), text
    (tmp_path / "m.py").write_text("from bgf_pyg.config import configure\n")
    assert not imports_the_cli(tmp_path / "m.py")
