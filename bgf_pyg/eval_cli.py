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

from .checks import InputError
from .cli import (
    EXIT_USAGE,
    USER_ERRORS,
    add_refine_options,
    add_threads_option,
    build_parser,
    build_run_method,
    check_refine_request,
    evaluate_refine_request,
    load_splits,
    refinement_tables,
    results_caption,
    row_name,
    setup_logging,
    transform_options,
    use_threads,
)
from .options import HelpFormatter, OneLineParser, check_refine, device, non_negative_int
from .run_folder import (
    BEST_CHECKPOINT,
    LAST_CHECKPOINT,
    atomic_write,
    load_checkpoint,
    require_keys,
)

PROG = "bgf-eval"


def build_eval_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=PROG, formatter_class=HelpFormatter,
                      description="Evaluate a bgf-train run's checkpoint without retraining, "
                                  "with and without test-time refinement.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run folder (bgf-train --out)")
    p.add_argument("--checkpoint", default=None,
                   help=f"checkpoint to evaluate (default: RUN_DIR/{BEST_CHECKPOINT}, or "
                        f"{LAST_CHECKPOINT} for a run that selected none)")
    add_refine_options(p, "evaluate the checkpoint")
    p.add_argument("--data-root", default=None,
                   help="dataset folder (default: the one the run was trained with)")
    p.add_argument("--device", type=device, default=None,
                   help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--num-workers", type=non_negative_int, default=0,
                   help="DataLoader worker processes")
    p.add_argument("--json", default=None, metavar="FILE",
                   help="also write every record (refinement, split, setting, metrics) to FILE "
                        "(default: none)")
    add_threads_option(p)
    return p


def run_options(config: dict, eval_args: argparse.Namespace) -> argparse.Namespace:
    """The run's ``bgf-train`` options: the parser's defaults, the checkpoint's stored options,
    then this command's refinement, data and device options."""
    args = build_parser().parse_args([])
    for name, value in config.items():
        if name.startswith("--"):
            setattr(args, name[2:].replace("-", "_"), value)
    for dest in ("refine", "refine_k", "refine_alpha", "num_workers", "threads"):
        setattr(args, dest, getattr(eval_args, dest))
    args.data_root = eval_args.data_root or config.get("data_root")
    args.feature_cache = config.get("feature_cache")
    args.device = eval_args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return args


def selected_checkpoint(run_dir: Path) -> Path:
    """The run's selected weights: ``best.pt``, or ``last.pt`` for a run that kept none
    (``--select-on last``)."""
    best = run_dir / BEST_CHECKPOINT
    return best if best.is_file() or not (run_dir / LAST_CHECKPOINT).is_file() else (
        run_dir / LAST_CHECKPOINT)


def evaluate_run(eval_args: argparse.Namespace) -> tuple[argparse.Namespace, list[dict]]:
    """Rebuild the run's model and splits, load the checkpoint, evaluate every refinement."""
    path = Path(eval_args.checkpoint) if eval_args.checkpoint else selected_checkpoint(
        Path(eval_args.run_dir))
    state = load_checkpoint(path)
    require_keys(state, ("model", "config"), path)
    config = state["config"] or {}
    args = run_options(config, eval_args)
    message = check_refine(args)
    if message is not None:
        raise InputError(message)
    splits = load_splits(args.dataset, args.data_root, augment=False, check_images="off",
                         options=transform_options(args), val_classes=args.val_classes,
                         val_seed=args.val_seed)
    if splits.val_class_ids != config.get("val_class_ids"):
        raise InputError(f"the validation classes rebuilt from {path}'s configuration differ "
                         "from the ones the run held out; was the dataset changed?")
    device = torch.device(args.device)
    method, splits = build_run_method(args, splits, device)
    check_refine_request(args, method, splits)
    try:
        method.load_state_dict(state["model"])
    except (RuntimeError, KeyError) as err:
        first = str(err).strip().splitlines()[0]
        raise InputError(f"{path} does not fit the model of its configuration: {first}") from err
    method.to(device)
    args.refine = args.refine if "none" in args.refine else ["none", *args.refine]
    args.checkpoint = f"{path} (epoch {state.get('epoch', '?')})"
    return args, evaluate_refine_request(args, method, splits, device)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``bgf-eval``; returns the exit code (2 for a user error)."""
    try:
        eval_args = build_eval_parser().parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    setup_logging()
    use_threads(eval_args.threads)
    try:
        args, records = evaluate_run(eval_args)
        if eval_args.json is not None:
            text = json.dumps(records, indent=1).encode()
            atomic_write(eval_args.json, lambda f: f.write(text))
    except USER_ERRORS as err:
        print(f"{PROG}: error: {' '.join(str(err).split())}", file=sys.stderr)
        return EXIT_USAGE
    print(f"{results_caption(args)}; weights: {args.checkpoint}")
    print(refinement_tables(row_name(args), records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
