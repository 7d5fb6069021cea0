"""``bgf-eval``: evaluate a saved run's checkpoint, with and without test-time refinement.

The model and the datasets are rebuilt from the configuration stored in the checkpoint (the
options ``bgf-train`` was run with, and the validation classes it held out), so nothing is
trained again. A refinement's k and α are chosen on those validation classes, never on the test
split (:mod:`bgf_pyg.refine.protocol`). User errors end with one line and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from .arguments import (
    EXIT_USAGE,
    USER_ERRORS,
    HelpFormatter,
    OneLineParser,
    add_options,
    argument_type,
    option_name,
    with_option_names,
)
from .checks import InputError, named_parameters
from .config import Config, from_checkpoint, resolve
from .console import setup_logging
from .domains import device, non_negative_int
from .experiment import use_threads
from .experiment.build import build_run_method
from .experiment.refinement import check_refine_request, evaluate_refine_request
from .experiment.splits import config_splits
from .options import check_refine
from .run_folder import (
    BEST_CHECKPOINT,
    LAST_CHECKPOINT,
    atomic_write,
    load_checkpoint,
    require_keys,
)
from .tables import refinement_tables, results_caption, row_name

PROG = "bgf-eval"
#: The run's options this command sets (the others are the checkpoint's).
REFINE_OPTIONS = ("refine", "refine_k", "refine_alpha")


def build_eval_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=PROG, formatter_class=HelpFormatter,
                      description="Evaluate a bgf-train run's checkpoint without retraining, "
                                  "with and without test-time refinement.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run folder (bgf-train --out)")
    p.add_argument("--checkpoint", default=None,
                   help=f"checkpoint to evaluate (default: RUN_DIR/{BEST_CHECKPOINT}, or "
                        f"{LAST_CHECKPOINT} for a run that selected none)")
    defaults = resolve({}, check=False)
    add_options(p, defaults, names=REFINE_OPTIONS)
    p.add_argument("--data-root", default=None,
                   help="dataset folder (default: the one the run was trained with)")
    p.add_argument("--device", type=argument_type(device), default=None,
                   help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--num-workers", type=argument_type(non_negative_int), default=0,
                   help="DataLoader worker processes")
    p.add_argument("--json", default=None, metavar="FILE",
                   help="also write every record (refinement, split, setting, metrics) to FILE "
                        "(default: none)")
    add_options(p, defaults, names=("threads",))
    return p


def run_options(stored: dict, eval_args: argparse.Namespace) -> Config:
    """The run's configuration: the checkpoint's stored options, then this command's
    refinement, data, device and thread options."""
    return from_checkpoint(
        stored, **{name: getattr(eval_args, name) for name in (*REFINE_OPTIONS, "num_workers",
                                                                "threads")},
        data_root=eval_args.data_root or stored.get("data_root"),
        feature_cache=stored.get("feature_cache"), device=eval_args.device)


def selected_checkpoint(run_dir: Path) -> Path:
    """The run's selected weights: ``best.pt``, or ``last.pt`` for a run that kept none
    (``--select-on last``)."""
    best = run_dir / BEST_CHECKPOINT
    return best if best.is_file() or not (run_dir / LAST_CHECKPOINT).is_file() else (
        run_dir / LAST_CHECKPOINT)


def evaluate_run(eval_args: argparse.Namespace) -> tuple[Config, str, list[dict]]:
    """Rebuild the run's model and splits, load the checkpoint, evaluate every refinement."""
    path = Path(eval_args.checkpoint) if eval_args.checkpoint else selected_checkpoint(
        Path(eval_args.run_dir))
    state = load_checkpoint(path)
    require_keys(state, ("model", "config"), path)
    stored = state["config"]
    if not isinstance(stored, dict) or not stored:
        raise InputError(f"{path} holds no configuration (its 'config' is "
                         f"{type(stored).__name__} {stored!r:.40}); was it edited?")
    try:
        config = run_options(stored, eval_args)
    except InputError as err:
        raise InputError(f"{path}: its stored configuration: {err}") from err
    message = check_refine(config, option_name)
    if message is not None:
        raise InputError(message)
    splits = config_splits(config, augment=False, check_images="off")
    if splits.val_class_ids != stored.get("val_class_ids"):
        raise InputError(f"the validation classes rebuilt from {path}'s configuration differ "
                         "from the ones the run held out; was the dataset changed?")
    device = torch.device(config.device)
    method, splits = build_run_method(config, splits, device)
    check_refine_request(config, method, splits)
    try:
        method.load_state_dict(state["model"])
    except (RuntimeError, ValueError, KeyError) as err:  # size mismatch, a refused layout
        first = str(err).strip().splitlines()[0]
        raise InputError(f"{path} does not fit the model of its configuration: {first}") from err
    method.to(device)
    if "none" not in config.refine:
        config.refine = ["none", *config.refine]
    weights = f"{path} (epoch {state.get('epoch', '?')})"
    return config, weights, evaluate_refine_request(config, method, splits, device)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``bgf-eval``; returns the exit code (2 for a user error)."""
    try:
        eval_args = build_eval_parser().parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    setup_logging()
    use_threads(eval_args.threads)
    try:
        config, weights, records = evaluate_run(eval_args)
        if eval_args.json is not None:
            text = json.dumps(records, indent=1).encode()
            atomic_write(eval_args.json, lambda f: f.write(text))
    except USER_ERRORS as err:
        message = with_option_names(" ".join(str(err).split()), named_parameters(err))
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    print(f"{results_caption(config)}; weights: {weights}")
    print(refinement_tables(row_name(config), records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
