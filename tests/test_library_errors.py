"""Library errors name the library's parameters (``samples_per_class``); only the command line
speaks in its flags (``--samples-per-class``), rewriting the parameters an error names."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from bgf_pyg.checks import InputError, named_parameters, naming
from bgf_pyg.cli import main, with_option_names
from bgf_pyg.models import build_backbone, build_method
from bgf_pyg.run_folder import LAST_CHECKPOINT, check_run_folder

PACKAGE = Path(__file__).resolve().parents[1] / "bgf_pyg"
#: The command-line layer, which may name its own flags.
CLI_MODULES = {"cli.py", "options.py", "sweep.py"}
#: Flags of other programs a library error may name (torchrun's).
FOREIGN_FLAGS = {"--nproc_per_node"}
FLAG = re.compile(r"(?<![\w-])--[a-z][\w-]*")


def raised_texts(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every string constant inside a ``raise`` statement of ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Raise):
            found += [(part.lineno, part.value) for part in ast.walk(node)
                      if isinstance(part, ast.Constant) and isinstance(part.value, str)]
    return found


def test_library_errors_name_no_command_line_flag():
    modules = [p for p in PACKAGE.rglob("*.py") if p.relative_to(PACKAGE).as_posix()
               not in CLI_MODULES]
    assert len(modules) > 20
    flags = [f"{path.relative_to(PACKAGE)}:{line}: {flag}" for path in modules
             for line, text in raised_texts(path) for flag in FLAG.findall(text)
             if flag not in FOREIGN_FLAGS]
    assert flags == []


def test_the_scan_finds_a_flag(tmp_path):
    module = tmp_path / "m.py"
    module.write_text('def f(n):\n    raise ValueError(f"--samples-per-class {n} is too small")\n')
    assert [f for _, text in raised_texts(module) for f in FLAG.findall(text)] == [
        "--samples-per-class"]


def test_a_library_error_names_the_parameter_and_the_cli_its_flag(tmp_path, capsys):
    (tmp_path / LAST_CHECKPOINT).write_bytes(b"")
    with pytest.raises(InputError) as caught:
        check_run_folder(tmp_path, resume=False, overwrite=False)
    message = str(caught.value)
    assert "resume=True" in message and "overwrite=True" in message and "--" not in message
    assert main(["--method", "plain", "--out", str(tmp_path), "--epochs", "1",
                 "--no-progress"]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line == (f"bgf-train: error: {tmp_path} already holds a run ({LAST_CHECKPOINT}); "
                    "continue it with --resume, replace it with --overwrite, or pass --out "
                    "ANOTHER_FOLDER")


def test_build_method_names_samples_per_class():
    with pytest.raises(ValueError, match=r"^samples_per_class=1 leaves no positive pairs") as err:
        build_method("plain", build_backbone("smallcnn", 8), 4, loss="multi_similarity",
                     samples_per_class=1)
    assert named_parameters(err.value) == ("samples_per_class",)
    assert with_option_names(str(err.value), named_parameters(err.value)).startswith(
        "--samples-per-class 1 leaves no positive pairs")


def test_option_names_leave_words_paths_and_longer_names_alone():
    message = ("/data/out/val_classes holds out.pt; pass out=DIR, not val_classes_x; k=3 "
               "gives k neighbours; val_classes.")
    assert with_option_names(message, ("out", "k", "val_classes")) == (
        "/data/out/val_classes holds out.pt; pass --out DIR, not val_classes_x; --k 3 "
        "gives k neighbours; --val-classes.")


def test_parameters_are_found_through_the_chain_of_causes():
    try:
        try:
            raise naming(ValueError("epochs=0"), "epochs")
        except ValueError as inner:
            raise InputError("wrapped") from inner
    except InputError as outer:
        assert named_parameters(outer) == ("epochs",)
