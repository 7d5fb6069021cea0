"""``bgf-train``: user errors end with one line on stderr and exit code 2; a tiny demo run prints
the results table; the evaluation protocol end to end: ``--select-on val|test|last``, the test
split evaluated once with the selected weights, the validation split recorded and kept on resume,
and the labels that say which protocol produced a number."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest
import torch

from bgf_pyg.cli import main
from bgf_pyg.data import DigitsDemo, build_transform
from bgf_pyg.data.splits import choose_val_classes
from bgf_pyg.models import build_backbone, build_method
from bgf_pyg.tables import format_table
from bgf_pyg.train import BEST_CHECKPOINT, LAST_CHECKPOINT, load_checkpoint, read_metrics


def fake_cub(root: Path, images: str, labels: str) -> Path:
    root.mkdir()
    (root / "images.txt").write_text(images)
    (root / "image_class_labels.txt").write_text(labels)
    return root


def assert_user_error(capsys, code: int, *fragments: str) -> None:
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("bgf-train: error:")
    for fragment in fragments:
        assert fragment in last


def test_bad_data_root(tmp_path, capsys):
    missing = tmp_path / "no_such_cub"
    code = main(["--dataset", "cub", "--data-root", str(missing), "--no-progress"])
    assert_user_error(capsys, code, str(missing))


def test_missing_data_root(capsys):
    assert_user_error(capsys, main(["--dataset", "cars", "--no-progress"]), "--data-root")


def test_truncated_annotation_file(tmp_path, capsys):
    root = fake_cub(tmp_path / "CUB_200_2011", "1 a/1.jpg\n2 a/2.jpg\n3\n", "1 1\n2 1\n")
    code = main(["--dataset", "cub", "--data-root", str(root), "--no-progress"])
    assert_user_error(capsys, code, "images.txt", "line 3")


def test_corrupt_image_is_found_before_training(tmp_path, capsys):
    root = fake_cub(tmp_path / "CUB_200_2011", "1 a/1.jpg\n2 a/2.jpg\n3 b/3.jpg\n",
                    "1 1\n2 1\n3 101\n")
    for rel in ("a/1.jpg", "a/2.jpg", "b/3.jpg"):
        (root / "images" / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / "images" / rel).write_bytes(b"\xff\xd8 truncated jpeg")
    code = main(["--dataset", "cub", "--data-root", str(root), "--backbone", "resnet18",
                 "--classes-per-batch", "1", "--samples-per-class", "2", "--epochs", "1",
                 "--select-on", "last",  # one training class: too few to hold any out
                 "--out", str(tmp_path / "run"), "--device", "cpu", "--no-progress"])
    assert_user_error(capsys, code, "cannot read 2 of the 2 images", "a/1.jpg")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv,fragment", [
    (["--method", "plain", "--loss", "triplet"], "'triplet' pair loss"),
    (["--method", "bgformer"], "semantic edges"),
])
def test_one_sample_per_class_with_pairs(tmp_path, capsys, argv, fragment):
    code = main([*argv, "--samples-per-class", "1", "--out", str(tmp_path), "--no-progress"])
    assert_user_error(capsys, code, "--samples-per-class 1", fragment)


def test_unknown_method(capsys):
    assert_user_error(capsys, main(["--method", "arcface"]), "invalid choice: 'arcface'")


def test_tiny_demo_run_prints_the_table(tmp_path, capsys):
    code = main(["--method", "plain", "--epochs", "1", "--embedding-dim", "16",
                 "--samples-per-class", "4", "--lr", "1e-3",
                 "--out", str(tmp_path), "--device", "cpu", "--no-augment", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0
    assert "| method | R@1 | R@2 | R@4 | R@8 | NMI | MAP@R |" in out
    assert out.strip().splitlines()[-1].startswith("| plain |")
    assert (tmp_path / "last.pt").is_file() and (tmp_path / "metrics.jsonl").is_file()


def test_lr_milestones_decay_the_learning_rate(tmp_path):
    code = main(["--method", "proxygml", "--epochs", "2", "--embedding-dim", "16",
                 "--batch-size", "60", "--lr", "1e-3", "--lr-milestones", "1", "--eval-every", "2",
                 "--out", str(tmp_path), "--device", "cpu", "--no-augment", "--no-progress"])
    assert code == 0
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["config"]["lr_milestones"] == [1]  # the header: the resolved options
    records = [r for r in records[1:] if not r.get("final")]
    assert [r["lr"] for r in records] == pytest.approx([1e-3, 1e-4])
    assert records[0]["epoch"] == 1


def test_graph_options_reach_the_method():
    from bgf_pyg.cli import build_parser, parse_args
    from bgf_pyg.experiment.build import method_hparams

    args = build_parser().parse_args(["--method", "bgformer", "--graph-layers", "1",
                                      "--graph-heads", "4", "--lam", "0.2", "--k", "5"])
    assert method_hparams(args).items() >= {"k": 5, "lam": 0.2, "num_layers": 1, "heads": 4,
                                            "detach_graph_input": False}.items()
    args = build_parser().parse_args(["--method", "bgformer", "--detach-graph-input"])
    assert method_hparams(args)["detach_graph_input"] is True
    # each method's own defaults: its configuration, not a parser's shared defaults
    args = parse_args(["--method", "intra-batch", "--temperature", "0.6"])
    assert method_hparams(args) == {"temperature": 0.6, "cat": False, "num_layers": 1,
                                    "heads": 2}
    assert method_hparams(parse_args(["--method", "plain"])) == {}


def test_format_table_mean_and_std():
    runs = [{"recall@1": 0.5, "nmi": 0.25}, {"recall@1": 0.7, "nmi": 0.35}]
    table = format_table([("m", runs), ("inshop", [{"recall@1": 0.9}])])
    assert "| m | 60.0 ± 14.1 | – | – | – | 30.0 ± 7.1 | – |" in table
    assert "| inshop | 90.0 | – |" in table


#: A tiny demo run: 16-d plain, no augmentation, 8 of the 40 training numbers × 60 a batch (2
#: steps an epoch).
TINY = ["--method", "plain", "--embedding-dim", "16", "--samples-per-class", "60",
        "--eval-every", "1", "--device", "cpu", "--no-progress", "--no-augment"]


def run_main(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def val_run(tmp_path_factory) -> tuple[Path, str, str]:
    """Two epochs selected on the validation numbers."""
    out = tmp_path_factory.mktemp("val") / "run"
    code, stdout, stderr = run_main([*TINY, "--epochs", "2", "--out", str(out)])
    assert code == 0, stderr
    return out, stdout, stderr


def reference_recall_at_1(emb: torch.Tensor, labels: torch.Tensor,
                          tie: float = 1e-5) -> tuple[float, float]:
    """R@1 by brute force in float64, as bounds: a query whose nearest other embeddings lie
    within ``tie`` of each other (float32 rounding may order them either way) is a hit for the
    upper bound if one of them shares its label, for the lower bound only if all of them do."""
    emb = emb.double()
    dist = torch.cdist(emb, emb)
    dist.fill_diagonal_(float("inf"))
    nearest = dist <= dist.min(1, keepdim=True).values + tie
    same = labels[None, :] == labels[:, None]
    hit_any = (nearest & same).any(1).double().mean().item()
    hit_all = (nearest & ~same).any(1).logical_not().double().mean().item()
    return hit_all, hit_any


def test_val_run_selects_on_val_and_tests_that_checkpoint_once(val_run):
    out, stdout, stderr = val_run
    records = read_metrics(out)
    epochs, finals = records[:-1], records[-1:]
    assert [r["split"] for r in epochs] == ["val", "val"]
    assert [r.get("final") for r in finals] == [True] and finals[0]["split"] == "test"
    best = max(epochs, key=lambda r: r["recall@1"])  # the first of equals, as fit keeps it
    assert finals[0]["selected_epoch"] == best["epoch"]
    state = load_checkpoint(out / BEST_CHECKPOINT)
    assert state["epoch"] == best["epoch"]
    # The reported test R@1 is that of best.pt's weights, recomputed here independently.
    method = build_method("plain", build_backbone("smallcnn", 16), 3)
    method.load_state_dict(state["model"])
    method.eval()
    test = DigitsDemo("test", transform=build_transform("demo", train=False))
    with torch.no_grad():
        emb = method.embed(torch.stack([test[i][0] for i in range(len(test))]))
    low, high = reference_recall_at_1(emb, test.labels)
    assert high - low <= 5 / len(test)  # a few near-ties at most
    assert low - 1e-6 <= finals[0]["recall@1"] <= high + 1e-6
    assert "checkpoint selected on the validation classes" in stdout
    assert stdout.strip().splitlines()[-1].startswith("| plain |")
    assert "test-selected" not in stdout + stderr


def test_val_split_is_recorded_and_kept_on_resume(val_run, tmp_path):
    out, _, _ = val_run
    held_out = load_checkpoint(out / LAST_CHECKPOINT)["config"]["val_class_ids"]
    assert held_out == choose_val_classes(sorted(set(DigitsDemo("train").class_ids)), 0.2, 0)
    assert not set(held_out) & set(DigitsDemo("test").class_ids)
    run = tmp_path / "run"
    shutil.copytree(out, run)
    code, _, err = run_main([*TINY, "--epochs", "2", "--out", str(run), "--resume",
                             "--val-seed", "7"])
    assert code == 2 and "--val-seed 7 now, 0 in the checkpoint" in err
    state = load_checkpoint(run / LAST_CHECKPOINT)  # a split changed behind the options' back
    state["config"]["val_class_ids"] = [0, 1]
    torch.save(state, run / LAST_CHECKPOINT)
    code, _, err = run_main([*TINY, "--epochs", "2", "--out", str(run), "--resume"])
    assert code == 2 and "val_class_ids" in err
    shutil.rmtree(run)
    shutil.copytree(out, run)
    code, _, err = run_main([*TINY, "--epochs", "3", "--out", str(run), "--resume"])
    assert code == 0, err
    records = read_metrics(run)
    assert [(r["epoch"], r["split"], bool(r.get("final"))) for r in records] == [
        (1, "val", False), (2, "val", False), (3, "val", False), (3, "test", True)]
    assert load_checkpoint(run / LAST_CHECKPOINT)["config"]["val_class_ids"] == held_out


def test_test_selected_result_is_labelled(tmp_path):
    code, stdout, stderr = run_main([*TINY, "--epochs", "1", "--select-on", "test",
                                     "--out", str(tmp_path)])
    assert code == 0, stderr
    assert "TEST-SELECTED" in stdout
    assert stdout.strip().splitlines()[-1].startswith("| plain (test-selected) |")
    metric_lines = [line for line in stderr.splitlines() if "recall@1" in line or "R@1" in line]
    assert len(metric_lines) == 3 and all("test-selected" in line for line in metric_lines)
    records = read_metrics(tmp_path)
    assert [(r["split"], r.get("select_on")) for r in records] == [("test", None),
                                                                   ("test", "test")]
    assert "val_class_ids" in load_checkpoint(tmp_path / LAST_CHECKPOINT)["config"]
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["final"]


@pytest.mark.parametrize("value,fragment", [
    ("-1", "expected 0, a fraction in (0, 1) or a class count"),
    ("1.5", "expected 0, a fraction in (0, 1) or a class count"),
    ("nan", "expected 0, a fraction in (0, 1) or a class count"),
    ("half", "expected 0, a fraction in (0, 1) or a class count"),
    ("1", "holds out 1 of the 50 training classes"),
    ("49", "holds out 49 of the 50 training classes"),
    ("0.01", "holds out 0 of the 50 training classes"),
    ("0", "--select-on val needs a validation split"),
])
def test_bad_val_classes_is_one_line_naming_the_option(tmp_path, value, fragment):
    code, stdout, stderr = run_main([*TINY, "--val-classes", value, "--out", str(tmp_path)])
    assert code == 2 and stdout == ""
    lines = stderr.strip().splitlines()
    assert lines[-1].startswith("bgf-train: error:") and "Traceback" not in stderr
    assert "--val-classes" in lines[-1] and fragment in lines[-1]
    assert not (tmp_path / LAST_CHECKPOINT).exists()


def test_val_seed_needs_a_validation_split(tmp_path):
    code, _, stderr = run_main([*TINY, "--select-on", "last", "--val-seed", "3",
                                "--out", str(tmp_path)])
    assert code == 2 and "--val-seed has no effect here" in stderr
