"""The run folder of :func:`bgf_pyg.train.fit`, kept so that nothing a user has is lost silently.

A run folder holds ``last.pt`` (after every epoch), ``best.pt`` (best Recall@1), ``metrics.jsonl``
(one JSON object per epoch) and ``curves.png``.

- :func:`prepare_run_folder`: a fresh run refuses a folder that holds a run unless asked to
  overwrite it; temporary files left by a killed checkpoint write are removed (under
  :func:`lock_run_folder`, so never those of a run still writing).
- :func:`atomic_write`: a temporary file in the same folder, then ``os.replace``: a kill leaves the
  old file or the new one; a failed write (a full disk) ends in an ``InputError`` naming the file
  and saying that the previous version is intact.
- :func:`read_metrics` drops a half-written last line (a kill during the append) with a warning
  and names the file and line of any other corrupt line.
- :func:`check_config` compares the configuration recorded in a checkpoint with the current one;
  :func:`load_checkpoint` reads the options of older checkpoints (stored under the command line's
  flags) by field name, as checkpoints now store them.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import tempfile
from collections.abc import Callable, Collection, Iterator, Mapping
from pathlib import Path
from typing import IO

import torch

from .checks import InputError, Name, error_chain, naming, show_value, worded

try:  # POSIX; on Windows runs are not locked
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

log = logging.getLogger(__name__)

LAST_CHECKPOINT = "last.pt"
BEST_CHECKPOINT = "best.pt"
METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"
#: The files that make up a run (what a fresh run would replace).
RUN_FILES = (LAST_CHECKPOINT, BEST_CHECKPOINT, METRICS_FILE, CURVES_FILE)
LOCK_FILE = ".lock"
TMP_SUFFIX = ".tmp"


# ---------------------------------------------------------------------------- writing


def _os_error_behind(err: BaseException) -> OSError | None:
    """The ``OSError`` behind ``err``: ``err`` itself, or the first one in its chain of
    ``__cause__``/``__context__`` (torch's zip writer reports a failed ``write`` as a
    ``RuntimeError`` "unexpected pos" whose context is the ``OSError``)."""
    return next((e for e in error_chain(err) if isinstance(e, OSError)), None)


@contextlib.contextmanager
def reporting_write_errors(path: Path) -> Iterator[None]:
    """Turn an ``OSError`` while writing ``path`` (e.g. ``ENOSPC``), raised directly or behind
    another exception (``torch.save``'s ``RuntimeError``), into an ``InputError`` that names the
    file."""
    try:
        yield
    except (OSError, RuntimeError) as raised:
        err = _os_error_behind(raised)
        if err is None:
            raise
        hint = (": no space left on device; free some space and continue with resume=True"
                if err.errno in (errno.ENOSPC, errno.EDQUOT) else f": {err.strerror or err}")
        raise naming(InputError(f"could not write {path}{hint} (its previous version is "
                                "intact)"), "resume") from raised


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> None:
    """Call ``write(file)`` on a temporary file next to ``path``, then rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with reporting_write_errors(path):
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
            raise


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """Write ``state`` to ``path`` atomically (:func:`atomic_write`)."""
    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint written by :func:`save_checkpoint` (``weights_only``)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # a truncated or foreign file raises several types
        raise InputError(f"could not read checkpoint {path}: {err}") from err
    if not isinstance(state, dict):
        raise InputError(f"{path} does not hold a checkpoint dict (got {type(state).__name__})")
    if isinstance(state.get("config"), dict):
        state["config"] = with_field_names(state["config"])
    return state


#: How checkpoints written before options were stored by field name began an option's key: the
#: command line's flag, ``--lr-milestones``. A fixed past format, so it is spelled out here
#: rather than derived from the command line, whose spelling may change.
LEGACY_KEY_PREFIX = "--"


def with_field_names(config: Mapping) -> dict:
    """A checkpoint's stored ``config`` with every option under its field name: an older
    checkpoint's ``--lr-milestones`` read as ``lr_milestones``; other keys as they are."""
    return {key.removeprefix(LEGACY_KEY_PREFIX).replace("-", "_")
            if key.startswith(LEGACY_KEY_PREFIX) else key: value
            for key, value in config.items()}


def require_keys(state: Mapping, keys: tuple[str, ...], path: str | os.PathLike) -> None:
    """Raise an ``InputError`` naming ``path`` and the keys it lacks."""
    missing = [k for k in keys if k not in state]
    if missing:
        raise InputError(f"{path} lacks {', '.join(missing)}: it is not a checkpoint of this "
                         "training loop (or was written by an older version)")


def check_config(
    saved: Mapping | None,
    current: Mapping | None,
    path: str | os.PathLike,
    uncompared: Collection[str] = (),
) -> None:
    """Refuse to resume from a checkpoint written with another configuration, naming every
    differing option (the keys ``uncompared`` aside: they record how the run was executed,
    e.g. :data:`bgf_pyg.config.EXECUTION_OPTIONS`). A checkpoint without a recorded
    configuration is not compared."""
    if current is None:
        return
    if saved is None:
        log.warning("%s records no configuration; the options are not compared", path)
        return
    differ = [k for k in sorted({*saved, *current} - set(uncompared))
              if saved.get(k) != current.get(k)]
    if differ:
        def wording(name: Name) -> str:
            changes = "; ".join(f"{name(k)} {show_value(current.get(k))} now, "
                                f"{show_value(saved.get(k))} in the checkpoint" for k in differ)
            return (f"{path} was written with other options ({changes}); resume with the same "
                    "options, or start a fresh run in another folder")

        raise worded(InputError(wording(lambda key: key)), wording)



# ---------------------------------------------------------------------------- the metrics log


#: Key of the metrics log's first line, the run's resolved options.
HEADER_KEY = "config"


def append_metrics(out: str | os.PathLike, record: dict) -> None:
    """Append ``record`` as one JSON line to ``<out>/metrics.jsonl``."""
    path = Path(out) / METRICS_FILE
    with reporting_write_errors(path), open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def _read_lines(out: str | os.PathLike) -> tuple[dict | None, list[dict]]:
    """The header (``{"config": ...}`` on the first line, if any) and the epoch records."""
    path = Path(out) / METRICS_FILE
    if not path.is_file():
        return None, []
    lines = path.read_text(encoding="utf-8").splitlines()
    last = max((i for i, line in enumerate(lines, start=1) if line.strip()), default=0)
    header, records = None, []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not records and header is None and isinstance(record, dict) and set(record) == {
                    HEADER_KEY}:
                header = record
                continue
            if not isinstance(record, dict) or not isinstance(record.get("epoch"), int):
                raise ValueError("expected an object with an integer 'epoch'")
        except ValueError as err:
            if number == last:
                log.warning("%s: dropped its last line %d, which is incomplete (%s)",
                            path, number, err)
                break
            raise InputError(f"{path}, line {number}: not a metrics record ({err})") from err
        records.append(record)
    return header, records


def read_metrics(out: str | os.PathLike) -> list[dict]:
    """The epoch records of ``<out>/metrics.jsonl`` (empty when there is none; the
    ``{"config": ...}`` header line is skipped).

    A last line that is not valid JSON (a run killed while appending) is dropped with a warning;
    a corrupt line elsewhere raises an ``InputError`` naming the file and line.
    """
    return _read_lines(out)[1]


def keep_metrics_until(out: str | os.PathLike, epoch: int, header: dict | None = None) -> None:
    """Drop the records after ``epoch`` (a run killed after logging but before its checkpoint
    repeats that epoch on resume), and the final test record (a resumed run evaluates the test
    split again when it ends); ``epoch=0`` starts a fresh log, whose first line is
    ``{"config": header}`` when ``header`` is given (a resumed log keeps its own)."""
    old_header, records = _read_lines(out)
    records = [r for r in records if r["epoch"] <= epoch and not r.get("final")]
    if epoch == 0:
        old_header = None if header is None else {HEADER_KEY: header}
    lines = ([old_header] if old_header is not None else []) + records
    text = "".join(json.dumps(r) + "\n" for r in lines).encode()
    atomic_write(Path(out) / METRICS_FILE, lambda f: f.write(text))


# ---------------------------------------------------------------------------- the folder


@contextlib.contextmanager
def lock_run_folder(out: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on ``out`` while a run uses it; a second process is refused.

    The lock is ``flock`` on ``<out>/.lock``, which its owner deletes when the run ends (before
    it unlocks, so no one else deletes a lock they do not hold). A process that opened the file
    just before the owner deleted it finds, once locked, that the path names another file or
    none, and locks the path afresh."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if fcntl is None:  # pragma: no cover
        yield
        return
    path = out / LOCK_FILE
    while True:
        lock = open(path, "a")  # closed below, or when the run ends
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise InputError(f"another process is training in {out}") from None
        if _same_file(lock, path):
            break
        lock.close()  # its previous owner deleted it after we opened it
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        fcntl.flock(lock, fcntl.LOCK_UN)
        lock.close()


def _same_file(opened: IO, path: Path) -> bool:
    """Whether ``path`` still names the file ``opened``."""
    try:
        named = path.stat()
    except FileNotFoundError:
        return False
    held = os.fstat(opened.fileno())
    return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)


def remove_stale_temp_files(out: str | os.PathLike) -> list[Path]:
    """Remove the temporary files a killed :func:`atomic_write` left for a run file (call it with
    the folder locked); return them."""
    stale = [p for name in RUN_FILES for p in Path(out).glob(f".{name}.*{TMP_SUFFIX}")]
    for path in stale:
        path.unlink(missing_ok=True)
    if stale:
        log.info("removed %d temporary file(s) of an interrupted checkpoint write in %s",
                 len(stale), out)
    return stale


def check_run_folder(out: str | os.PathLike, resume: bool, overwrite: bool) -> list[str]:
    """Refuse a fresh run in a folder that holds a run (unless ``overwrite``) and a resume without
    ``last.pt``; return the run files a fresh run will replace. Cheap: callers run it before
    loading any data."""
    out = Path(out)
    if resume:
        if not (out / LAST_CHECKPOINT).is_file():
            raise naming(FileNotFoundError(
                f"checkpoint not found: {out / LAST_CHECKPOINT} (nothing to continue; drop "
                "resume=True to start a fresh run)"), "resume")
        return []
    existing = [name for name in RUN_FILES if (out / name).exists()]
    if existing and not overwrite:
        raise naming(InputError(
            f"{out} already holds a run ({', '.join(existing)}); continue it with resume=True, "
            "replace it with overwrite=True, or pass out=ANOTHER_FOLDER"),
            "resume", "overwrite", "out")
    return existing


def prepare_run_folder(out: str | os.PathLike, resume: bool, overwrite: bool) -> None:
    """Make ``out`` ready (call it with the folder locked): remove stale temporary files and, for a
    fresh run, refuse a folder that holds a run unless ``overwrite`` (then its run files, and only
    those, are deleted)."""
    out = Path(out)
    remove_stale_temp_files(out)
    for name in check_run_folder(out, resume, overwrite):
        (out / name).unlink()
