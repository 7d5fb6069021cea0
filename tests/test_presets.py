"""Presets: every shipped preset starts a run on a fixture in its dataset's official layout and
records its values; bad presets and bad option combinations are one-line errors (exit code 2)."""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path

import pytest
import torch

from bgf_pyg.cli import main
from bgf_pyg.config import check_preset
from bgf_pyg.presets import available_presets, load_preset
from tests.data.test_datasets import make_cars, make_cub, make_inshop, make_sop
from tests.test_cli import assert_user_error

MAKERS = {"cub": make_cub, "cars": make_cars, "sop": make_sop, "inshop": make_inshop}
#: Heavy values the tests override (everything else must come from the preset). The ViT is
#: tested in test_vit.py; the small CNN stands in for every backbone here, a 64-d graph for
#: BGFormer's (backbone-wide) one.
SMALL = {"epochs": 1, "image_size": 32, "test_resize": 36, "backbone": "smallcnn",
         "embedding_dim": 32}
#: Per method: the batch (the fixtures hold 2 training classes of 1-3 images).
BATCH = {"proxygml": {"batch_size": 2}, "intra-batch": {"classes_per_batch": 2,
                                                        "samples_per_class": 3}}
BATCH["bgformer"] = {**BATCH["intra-batch"], "graph_dim": 64, "k": 3}  # k below the batch
EXPECTED = {f"{m}-{d}" for m in ("bgformer", "intra-batch") for d in MAKERS} | {
    f"proxygml-{d}" for d in ("cub", "cars", "sop")}


def test_every_original_has_a_preset():
    assert set(available_presets()) == EXPECTED


def run_config(tmp_path) -> dict:
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    return json.loads(lines[0])["config"]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_preset_runs_one_epoch_and_records_its_values(name, tmp_path, capsys, tiny_eval):
    preset = load_preset(name)
    root = MAKERS[preset["dataset"]](tmp_path)
    argv = ["--preset", name, "--data-root", str(root), "--out", str(tmp_path / "run"),
            "--device", "cpu", "--no-progress", "--no-amp",
            "--select-on", "last"]  # the fixtures' 2 training classes: none to hold out
    overrides = {**SMALL, **BATCH[preset["method"]]}
    for key, value in overrides.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    overrides.update(amp=False, select_on="last")
    assert main(argv) == 0, capsys.readouterr().err
    config = run_config(tmp_path)
    assert "configuration:" in capsys.readouterr().err  # the log line
    assert config["preset"] == name
    for key, value in preset.items():
        if key in overrides:
            assert config[key] == overrides[key]  # explicit options win
        elif key == "lr_milestones":  # the steps beyond the shortened run are dropped
            assert config[key] == ([m for m in value if m < SMALL["epochs"]] or None)
        else:
            assert config[key] == value, key
    checkpoint = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert checkpoint["config"]["lr"] == config["lr"] == preset["lr"]  # stored by field name


def test_list_presets(capsys):
    assert main(["--list-presets"]) == 0
    out = capsys.readouterr().out
    for name in EXPECTED:
        assert name in out


def test_unknown_preset_lists_the_valid_ones(capsys):
    code = main(["--preset", "bgformer-mnist", "--no-progress"])
    assert_user_error(capsys, code, "bgformer-mnist", "bgformer-cub", "proxygml-sop")


@pytest.mark.parametrize("content,fragment", [
    ({"lr": 1e-4, "learning_rate": 3e-5}, "unknown key 'learning_rate'"),
    ({"lr": "fast"}, "lr must be a number"),
    ({"epochs": 2.5}, "epochs must be an int"),
    ({"amp": 1}, "amp must be true or false"),
    ({"crop_scale": 0.2}, "crop_scale must be an array of 2 values"),
    ({"method": "bgformerz"}, "method must be one of"),
    ({"out": "elsewhere"}, "unknown key 'out'"),
])
def test_bad_preset_file(content, fragment, monkeypatch, capsys):
    from bgf_pyg import config

    monkeypatch.setattr(config, "load_preset", lambda name: content)
    code = main(["--preset", "bgformer-cub", "--no-progress"])
    assert_user_error(capsys, code, "preset 'bgformer-cub'", fragment)


def test_shipped_presets_are_valid():
    for name in available_presets():
        check_preset(load_preset(name), name)


def test_graph_dim_not_divisible_by_heads(capsys):
    code = main(["--method", "bgformer", "--graph-dim", "100", "--graph-heads", "8",
                 "--no-progress"])
    assert_user_error(capsys, code, "--graph-dim (100)", "--graph-heads (8)")


def test_pce_needs_two_samples_per_class(capsys):
    code = main(["--method", "plain", "--loss", "pce", "--samples-per-class", "1",
                 "--no-progress"])
    assert_user_error(capsys, code, "--samples-per-class")



def test_preset_mixed_precision_on_the_cpu_is_a_note(tmp_path, capsys):
    """A recipe's GPU-only AMP becomes float32 on the CPU with a note; an explicit --amp there is
    still refused."""
    from bgf_pyg.cli import parse_args

    assert load_preset("bgformer-cub")["amp"] is True
    common = ["--preset", "bgformer-cub", "--data-root", str(tmp_path), "--device", "cpu",
              "--backbone", "resnet18"]  # the preset's ViT needs the optional timm
    args = parse_args(common)
    notes = [line for line in capsys.readouterr().err.splitlines() if ": note: " in line]
    assert args.amp is False
    assert len(notes) == 1 and "mixed precision" in notes[0]
    with pytest.raises(SystemExit):
        parse_args([*common, "--amp"])
    assert "--amp" in capsys.readouterr().err


def test_preset_schedule_cut_by_epochs_is_a_note(tmp_path, capsys):
    from bgf_pyg.cli import parse_args

    assert load_preset("proxygml-cub")["lr_milestones"] == [19, 39]
    args = parse_args(["--preset", "proxygml-cub", "--data-root", str(tmp_path), "--device",
                       "cpu", "--epochs", "20"])
    notes = [line for line in capsys.readouterr().err.splitlines() if ": note: " in line]
    assert args.lr_milestones == [19]
    assert len(notes) == 1 and "--lr-milestones 19 39" in notes[0] and "keeping 19" in notes[0]


def header(name: str) -> str:
    """The comment lines heading preset ``name``."""
    lines = resources.files("bgf_pyg.presets").joinpath(f"{name}.toml").read_text().splitlines()
    return "\n".join(line for line in lines if line.startswith("#"))


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_presets_run_the_papers_protocol_and_say_so(name, tmp_path):
    """A preset selects on the test split with every training class, as its paper did, says so in
    its header, and the validation protocol is one option away."""
    from bgf_pyg.cli import parse_args

    common = ["--preset", name, "--data-root", str(tmp_path), "--device", "cpu",
              "--backbone", "resnet18"]  # the BGFormer presets' ViT needs the optional timm
    args = parse_args(common)
    assert (args.select_on, args.val_classes) == ("test", 0)
    text = " ".join(header(name).replace("#", " ").split())
    assert 'select_on = "test"' in text and "test-selected" in text
    assert "training on all training classes" in text and "--select-on val" in text
    honest = parse_args([*common, "--select-on", "val"])
    assert (honest.select_on, honest.val_classes) == ("val", 0.2)


def test_the_docs_state_the_presets_protocol():
    page = (Path(__file__).resolve().parents[1] / "docs" / "reproducing.rst").read_text(
        encoding="utf-8")
    section = re.search(r"^Model selection\n-+\n(.*?)\n\S[^\n]*\n-+\n", page, re.S | re.M).group(1)
    section = " ".join(section.split())
    assert 'keeps the best epoch on the test split (``select_on = "test"``)' in section
    assert "``--select-on val`` runs this package's protocol instead" in section
    assert "last evaluation" not in section
