"""``bgf-train``: user errors end with one line on stderr and exit code 2; a tiny demo run prints
the results table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bgf_pyg.cli import format_table, main


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
    from bgf_pyg.cli import build_parser, method_hparams

    args = build_parser().parse_args(["--method", "bgformer", "--graph-layers", "1",
                                      "--graph-heads", "4", "--lam", "0.2", "--k", "5"])
    assert method_hparams(args) == {"k": 5, "lam": 0.2, "num_layers": 1, "heads": 4,
                                    "detach_graph_input": False}
    args = build_parser().parse_args(["--method", "bgformer", "--detach-graph-input"])
    assert method_hparams(args)["detach_graph_input"] is True
    args = build_parser().parse_args(["--method", "intra-batch", "--temperature", "0.6"])
    assert method_hparams(args) == {"temperature": 0.6, "cat": False}
    assert method_hparams(build_parser().parse_args(["--method", "plain"])) == {}


def test_format_table_mean_and_std():
    runs = [{"recall@1": 0.5, "nmi": 0.25}, {"recall@1": 0.7, "nmi": 0.35}]
    table = format_table([("m", runs), ("inshop", [{"recall@1": 0.9}])])
    assert "| m | 60.0 ± 14.1 | – | – | – | 30.0 ± 7.1 | – |" in table
    assert "| inshop | 90.0 | – |" in table
