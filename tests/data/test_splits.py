"""The evaluation protocol (design §12): the validation split of held-out training classes,
``--select-on val|test|last``, the test split evaluated once with the selected weights, and the
labels that say which protocol produced a number."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, TensorDataset

from bgf_pyg import train
from bgf_pyg.checks import InputError
from bgf_pyg.cli import main
from bgf_pyg.data import CUB200, DigitsDemo, build_transform
from bgf_pyg.data.base import LabelledDataset
from bgf_pyg.data.splits import choose_val_classes, split_validation
from bgf_pyg.models import build_backbone, build_method
from bgf_pyg.train import BEST_CHECKPOINT, LAST_CHECKPOINT, fit, load_checkpoint, read_metrics

#: A tiny demo run: 16-d plain, no augmentation, 8 of the 40 training numbers × 60 a batch (2
#: steps an epoch).
TINY = ["--method", "plain", "--embedding-dim", "16", "--samples-per-class", "60",
        "--eval-every", "1", "--device", "cpu", "--no-progress", "--no-augment"]


class Classes(LabelledDataset):
    """Items that are just their class ids (for the split's properties)."""

    def __init__(self, class_ids):
        self.class_ids = list(class_ids)
        self.labels = torch.zeros(len(self.class_ids), dtype=torch.long)
        self.transform = None

    def load(self, index):
        return self.class_ids[index]


# ---------------------------------------------------------------------------- the split


@settings(max_examples=40, deadline=None)
@given(classes=st.sets(st.integers(-50, 500), min_size=4, max_size=30),
       repeats=st.integers(1, 3), seed=st.integers(0, 2**32 - 1), data=st.data())
def test_split_is_disjoint_seeded_and_independent_of_order(classes, repeats, seed, data):
    ids = sorted(classes) * repeats
    spec = data.draw(st.one_of(st.integers(2, len(classes) - 2),
                               st.floats(2 / len(classes), 1 - 2 / len(classes))))
    expected = round(spec * len(classes)) if isinstance(spec, float) else spec
    if not 2 <= expected <= len(classes) - 2:  # rounding left too few: the error case
        with pytest.raises(InputError, match="val_classes"):
            choose_val_classes(ids, spec, seed)
        return
    shuffled = data.draw(st.permutations(ids))
    train_part, val_part, held_out = split_validation(Classes(shuffled), spec, seed)
    assert held_out == choose_val_classes(ids, spec, seed)  # the order of the items is irrelevant
    assert len(held_out) == expected and set(held_out) <= classes
    assert set(val_part.class_ids) == set(held_out)
    assert set(train_part.class_ids) == classes - set(held_out)
    assert len(train_part) + len(val_part) == len(ids)
    assert [val_part[i][0] for i in range(len(val_part))] == val_part.class_ids
    for part in (train_part, val_part):  # labels re-indexed in sorted class-id order
        assert part.labels.tolist() == [sorted(set(part.class_ids)).index(c)
                                        for c in part.class_ids]


def test_split_depends_on_the_seed():
    splits = {tuple(choose_val_classes(range(100), 0.2, seed)) for seed in range(5)}
    assert len(splits) == 5


def test_demo_validation_numbers_come_from_the_training_numbers():
    train = DigitsDemo("train")
    train_part, val_part, held_out = split_validation(
        train, 10, seed=0, val_transform=lambda x: x + 100)
    test_numbers = set(DigitsDemo("test").class_ids)
    assert set(held_out) < set(train.class_ids) and not set(held_out) & test_numbers
    assert not set(train_part.class_ids) & (set(held_out) | test_numbers)
    image, label = val_part[0]
    assert image.min() > 50 and label == 0  # its own transform; labels 0..9
    assert train_part.num_classes == 40 and val_part.num_classes == 10


def test_image_dataset_split(tmp_path):
    root = tmp_path / "CUB_200_2011"
    (root / "images").mkdir(parents=True)
    classes = [1, 2, 3, 4, 5, 6, 101]
    (root / "images.txt").write_text("".join(f"{i} {i}.jpg\n" for i in range(1, 8)))
    (root / "image_class_labels.txt").write_text(
        "".join(f"{i} {c}\n" for i, c in enumerate(classes, start=1)))
    for i in range(1, 8):
        (root / "images" / f"{i}.jpg").touch()
    train_part, val_part, held_out = split_validation(CUB200(root, "train"), 0.5, seed=3)
    assert len(held_out) == 3 and set(held_out) < {1, 2, 3, 4, 5, 6}
    assert sorted(train_part.class_ids + val_part.class_ids) == [1, 2, 3, 4, 5, 6]
    assert [train_part.dataset.paths[i].name for i in val_part.indices] == \
        [f"{c}.jpg" for c in held_out]


# ---------------------------------------------------------------------------- selection in fit


def weights_sum(method) -> float:
    return sum(p.detach().double().sum().item() for p in method.parameters())


@pytest.mark.parametrize("select_on,val_epoch,test_epoch", [
    ("val", 2, 2), ("test", None, 3), ("last", 3, 3),
])
def test_fit_selects_on_the_split_it_says(tmp_path, monkeypatch, select_on, val_epoch,
                                          test_epoch):
    """Scripted R@1 per split and epoch: val peaks at epoch 2, test at epoch 3. The final test
    number must come from the weights of the epoch the protocol selects (found by their sum)."""
    script = {"val": [0.5, 0.9, 0.6], "test": [0.7, 0.2, 0.95]}
    calls, epoch_of_weights = {"val": 0, "test": 0}, {}

    def scripted_evaluate(method, loader, device, *, gallery_loader=None, progress=False):
        split = loader.split
        if select_on == "test" or split == "val":  # a periodic evaluation
            calls[split] += 1
            epoch_of_weights[weights_sum(method)] = calls[split]
            return {"recall@1": script[split][calls[split] - 1]}
        epoch = epoch_of_weights[weights_sum(method)]  # the final test: whose weights?
        return {"recall@1": script["test"][epoch - 1], "weights_of_epoch": epoch}

    monkeypatch.setattr(train, "evaluate", scripted_evaluate)
    torch.manual_seed(0)
    images, labels = torch.randn(24, 1, 28, 28), torch.arange(4).repeat_interleave(6)
    method = build_method("plain", build_backbone("smallcnn", 8), 4)
    loader = DataLoader(TensorDataset(images, labels), batch_size=12, shuffle=True)
    val, test = DataLoader([]), DataLoader([])
    val.split, test.split = "val", "test"
    plan = ({"eval_loader": test, "eval_split": "test"} if select_on == "test" else
            {"eval_loader": val, "eval_split": "val", "test_loader": test})
    result = fit(method, loader, train.build_optimizer(method, 1e-2, 1e-2), tmp_path, epochs=3,
                 select_on=select_on, progress=False, **plan)
    final = read_metrics(tmp_path)[-1]
    assert final["final"] and final["split"] == "test" and final["select_on"] == select_on
    assert final["selected_epoch"] == result.selected_epoch == test_epoch
    assert result.test_metrics["recall@1"] == script["test"][test_epoch - 1]
    if select_on != "test":
        assert result.test_metrics["weights_of_epoch"] == test_epoch
    epochs = [r for r in read_metrics(tmp_path) if not r.get("final")]
    assert [r["split"] for r in epochs] == [plan["eval_split"]] * 3
    if val_epoch is not None and select_on == "val":
        assert load_checkpoint(tmp_path / BEST_CHECKPOINT)["epoch"] == val_epoch


# ---------------------------------------------------------------------------- bgf-train


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


def reference_recall_at_1(emb: torch.Tensor, labels: torch.Tensor) -> float:
    """R@1 by brute force in float64: the label of each embedding's nearest other embedding."""
    emb = emb.double()
    dist = torch.cdist(emb, emb)
    dist.fill_diagonal_(float("inf"))
    return (labels[dist.argmin(1)] == labels).double().mean().item()


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
    assert finals[0]["recall@1"] == pytest.approx(reference_recall_at_1(emb, test.labels),
                                                  abs=1e-6)
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

