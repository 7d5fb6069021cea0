"""Run folders: nothing a user has is lost without ``--overwrite``, killed writes are cleaned up,
a full disk, a foreign checkpoint or a half-written log end in one clear line."""

from __future__ import annotations

import errno
import fcntl
import io
import json
import shutil

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from bgf_pyg.checks import InputError
from bgf_pyg.cli import main
from bgf_pyg.eval_cli import main as eval_main
from bgf_pyg.models import build_backbone, build_method, build_optimizer
from bgf_pyg.run_folder import (
    BEST_CHECKPOINT,
    LAST_CHECKPOINT,
    LOCK_FILE,
    METRICS_FILE,
    load_checkpoint,
    lock_run_folder,
    prepare_run_folder,
    read_metrics,
    save_checkpoint,
)
from bgf_pyg.train import fit

#: A tiny demo run (about a second): plain method, 16-d, 5 batches of 5×36, no augmentation.
TINY = ["--method", "plain", "--embedding-dim", "16", "--samples-per-class", "36",
        "--device", "cpu", "--no-progress", "--no-augment"]


def train(out, *extra):
    return main([*TINY, "--out", str(out), "--epochs", "1", *extra])


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished one-epoch run, copied by each test that changes it."""
    out = tmp_path_factory.mktemp("runs") / "run"
    assert train(out) == 0
    return out


@pytest.fixture
def run_copy(finished_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    return out


def last_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def test_fresh_run_refuses_a_folder_holding_a_run(run_copy, capsys):
    before = {p.name: p.read_bytes() for p in run_copy.iterdir() if p.is_file()}
    assert {LAST_CHECKPOINT, BEST_CHECKPOINT, METRICS_FILE} <= set(before)
    assert train(run_copy) == 2
    line = last_error(capsys)
    assert str(run_copy) in line and "--resume" in line and "--overwrite" in line
    assert {p.name: p.read_bytes() for p in run_copy.iterdir() if p.is_file()} == before


@pytest.mark.parametrize("name", [BEST_CHECKPOINT, METRICS_FILE])
def test_a_partial_run_is_protected_too(tmp_path, name):
    (tmp_path / name).write_text("x")
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match=name):
        prepare_run_folder(tmp_path, resume=False, overwrite=False)
    prepare_run_folder(tmp_path, resume=False, overwrite=True)
    assert not (tmp_path / name).exists()
    assert (tmp_path / "notes.txt").read_text() == "mine"  # only the run's files go


def test_resume_without_a_checkpoint_stops_before_loading_data(tmp_path, capsys):
    assert main([*TINY, "--out", str(tmp_path), "--resume"]) == 2
    line = last_error(capsys)
    assert "checkpoint not found" in line and "last.pt" in line


def test_stale_temp_files_are_removed_and_nothing_else(tmp_path):
    stale = [tmp_path / ".last.pt.k1ll3d.tmp", tmp_path / ".best.pt.x.tmp",
             tmp_path / ".metrics.jsonl.y.tmp"]
    kept = [tmp_path / ".notes.tmp", tmp_path / "last.pt.backup", tmp_path / "mine.tmp"]
    for path in stale + kept:
        path.write_bytes(b"partial")
    with lock_run_folder(tmp_path):
        prepare_run_folder(tmp_path, resume=False, overwrite=False)
    assert not any(p.exists() for p in stale)
    assert all(p.exists() for p in kept)


def test_a_second_process_cannot_use_a_locked_folder(tmp_path):
    with lock_run_folder(tmp_path):
        with pytest.raises(InputError, match="another process is training"):
            with lock_run_folder(tmp_path):
                pass
    with lock_run_folder(tmp_path):  # released
        pass


def test_a_finished_run_leaves_no_lock_file(finished_run):
    assert LAST_CHECKPOINT in {p.name for p in finished_run.iterdir()}
    assert not (finished_run / LOCK_FILE).exists()


def test_only_the_owner_removes_the_lock(tmp_path):
    with lock_run_folder(tmp_path):
        assert (tmp_path / LOCK_FILE).exists()
        with pytest.raises(InputError, match="another process is training"):
            with lock_run_folder(tmp_path):
                pass
        assert (tmp_path / LOCK_FILE).exists()  # the refused process left it alone
    assert not (tmp_path / LOCK_FILE).exists()


def test_a_lock_file_its_owner_deleted_meanwhile_is_locked_afresh(tmp_path, monkeypatch):
    """A process that opened ``.lock`` just before the owner deleted it and unlocked must not
    hold a lock on the deleted file (a third process could then lock a new one)."""
    real_flock, calls = fcntl.flock, []

    def flock_after_the_owner_left(lock, operation):
        if not calls:  # the owner ends its run between our open() and our flock()
            (tmp_path / LOCK_FILE).unlink()
        calls.append(operation)
        return real_flock(lock, operation)

    monkeypatch.setattr(fcntl, "flock", flock_after_the_owner_left)
    with lock_run_folder(tmp_path):
        monkeypatch.undo()
        assert len(calls) == 2  # locked the deleted file, noticed, locked the new one
        with pytest.raises(InputError, match="another process is training"):
            with lock_run_folder(tmp_path):
                pass
    assert not (tmp_path / LOCK_FILE).exists()


def test_full_disk_names_the_file_and_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / LAST_CHECKPOINT
    save_checkpoint(path, {"epoch": 1})

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("bgf_pyg.run_folder.os.fsync", no_space)
    with pytest.raises(InputError, match=f"could not write {path}: no space left on device"):
        save_checkpoint(path, {"epoch": 2})
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == [LAST_CHECKPOINT]


def test_full_disk_during_a_run_is_one_line(tmp_path, monkeypatch, capsys):
    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("bgf_pyg.run_folder.os.fsync", no_space)
    assert train(tmp_path / "run") == 2
    assert "no space left on device" in last_error(capsys)


class FillingDisk(io.FileIO):
    """A file on a disk that fills after ``room`` bytes: its writes fail with ``ENOSPC``."""

    room = 4096

    def write(self, data):
        if self.tell() + len(memoryview(data).cast("B")) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().write(data)


def fill_disk(monkeypatch, room: int) -> None:
    monkeypatch.setattr(FillingDisk, "room", room)
    monkeypatch.setattr("bgf_pyg.run_folder.os.fdopen",
                        lambda fd, mode="wb": FillingDisk(fd, "wb"))


def test_torch_save_reports_a_full_disk_as_a_runtime_error(tmp_path):
    """The form the next tests rely on: torch's zip writer hides the ``OSError`` behind a
    ``RuntimeError``."""
    with FillingDisk(tmp_path / "x.pt", "wb") as f, pytest.raises(RuntimeError) as caught:
        torch.save({"w": torch.randn(10_000)}, f)
    cause = caught.value.__cause__ or caught.value.__context__
    assert isinstance(cause, OSError) and cause.errno == errno.ENOSPC


def test_disk_filling_inside_torch_save_names_the_file(tmp_path, monkeypatch):
    path = tmp_path / LAST_CHECKPOINT
    save_checkpoint(path, {"epoch": 1, "w": torch.randn(100)})
    fill_disk(monkeypatch, room=4096)
    with pytest.raises(InputError) as caught:
        save_checkpoint(path, {"epoch": 2, "w": torch.randn(10_000)})
    monkeypatch.undo()
    assert str(caught.value) == (f"could not write {path}: no space left on device; free some "
                                 "space and continue with resume=True (its previous version "
                                 "is intact)")
    assert load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == [LAST_CHECKPOINT]  # no temporary file left


def test_other_runtime_errors_of_torch_save_pass_through(tmp_path, monkeypatch):
    def broken(obj, f):
        raise RuntimeError("not a disk problem")

    monkeypatch.setattr("bgf_pyg.run_folder.torch.save", broken)
    with pytest.raises(RuntimeError, match="not a disk problem"):
        save_checkpoint(tmp_path / LAST_CHECKPOINT, {})
    assert list(tmp_path.iterdir()) == []


def test_disk_filling_inside_torch_save_during_a_run_is_one_line(tmp_path, monkeypatch, capsys):
    fill_disk(monkeypatch, room=4096)  # room for the metrics log, not for a checkpoint
    out = tmp_path / "run"
    assert train(out) == 2
    line = last_error(capsys)
    assert line == (f"bgf-train: error: could not write {out / BEST_CHECKPOINT}: no space left "
                    "on device; free some space and continue with --resume (its previous "
                    "version is intact)")
    assert not list(out.glob("*.tmp"))


def test_resume_with_other_options_names_them(run_copy, capsys):
    assert main([*TINY, "--out", str(run_copy), "--epochs", "2", "--resume", "--lr", "0.01",
                 "--weight-decay", "0"]) == 2
    line = last_error(capsys)
    assert "--lr 0.01 now, 0.001 in the checkpoint" in line
    assert "--weight-decay 0.0 now, 0.0001 in the checkpoint" in line


def test_resume_from_a_checkpoint_lacking_keys(run_copy, capsys):
    torch.save({"model": {}, "epoch": 1}, run_copy / LAST_CHECKPOINT)
    assert main([*TINY, "--out", str(run_copy), "--epochs", "2", "--resume"]) == 2
    line = last_error(capsys)
    assert "last.pt lacks optimizer, scaler" in line


def test_weights_with_the_older_trunk_projection_are_refused(run_copy, capsys):
    saved = torch.load(run_copy / LAST_CHECKPOINT, weights_only=True)
    head = saved["model"]["backbone.head.weight"]  # older graph_dim: head(proj(trunk(x)))
    saved["model"]["backbone.proj.weight"] = torch.zeros(head.size(1), head.size(1))
    saved["model"]["backbone.proj.bias"] = torch.zeros(head.size(1))
    torch.save(saved, run_copy / LAST_CHECKPOINT)
    assert main([*TINY, "--out", str(run_copy), "--epochs", "2", "--resume"]) == 2
    assert "graph_dim now projects on the graph module's side" in last_error(capsys)
    assert eval_main([str(run_copy), "--checkpoint", str(run_copy / LAST_CHECKPOINT),
                      "--device", "cpu"]) == 2
    line = last_error(capsys)
    assert "does not fit the model of its configuration: the weights hold backbone.proj" in line


def test_resume_into_another_model_is_refused(tmp_path):
    loader = DataLoader(TensorDataset(torch.randn(8, 1, 28, 28), torch.arange(4).repeat(2)),
                        batch_size=8)

    def fit_width(width, resume):
        method = build_method("proxygml", build_backbone("smallcnn", width), 4)
        fit(method, loader, build_optimizer(method, 1e-3, 1e-2), tmp_path, epochs=2 if resume
            else 1, resume=resume, progress=False)

    fit_width(8, resume=False)
    with pytest.raises(InputError, match="does not fit this model"):
        fit_width(16, resume=True)


def test_resume_below_the_checkpoints_epoch_is_an_error(run_copy, capsys):
    assert main([*TINY, "--out", str(run_copy), "--epochs", "1", "--resume"]) == 0
    assert "nothing to do" in capsys.readouterr().err
    state = load_checkpoint(run_copy / LAST_CHECKPOINT)
    state["epoch"] = 3
    torch.save(state, run_copy / LAST_CHECKPOINT)
    assert main([*TINY, "--out", str(run_copy), "--epochs", "2", "--resume"]) == 2
    assert "--epochs 2 is below the 3 epochs" in last_error(capsys)


def test_half_written_last_line_is_dropped_on_resume(run_copy, capsys):
    with open(run_copy / METRICS_FILE, "a") as f:
        f.write('{"epoch": 2, "lo')  # killed while appending epoch 2
    assert main([*TINY, "--out", str(run_copy), "--epochs", "2", "--resume"]) == 0
    err = capsys.readouterr().err
    # line 1 is the configuration header, line 2 epoch 1's record, line 3 its final test
    assert f"{run_copy / METRICS_FILE}: dropped its last line 4" in err
    assert "resumed from" in err and "randomly initialised" not in err
    assert "trained 1 epoch (2–2)" in err
    assert [r["epoch"] for r in read_metrics(run_copy) if not r.get("final")] == [1, 2]


def test_corrupt_line_elsewhere_names_file_and_line(tmp_path):
    lines = [json.dumps({"epoch": 1}), "{not json", json.dumps({"epoch": 3})]
    (tmp_path / METRICS_FILE).write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError, match=rf"{METRICS_FILE}, line 2: not a metrics record"):
        read_metrics(tmp_path)
