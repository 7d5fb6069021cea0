"""``bgf-train``: train one method on one dataset, evaluate it and print a results table.

The options are the fields of :class:`~bgf_pyg.config.Config` (:mod:`bgf_pyg.arguments`
generates the parser and ``--help``); the command parses them into a configuration and calls
:func:`bgf_pyg.experiment.run`. Every option is checked before any work starts (value domains,
the methods and datasets each option applies to, cross-option rules). Errors a user can cause (a
bad option, a wrong data root, a truncated annotation file, a corrupt image, an impossible
sampling setting, a run folder in use, a diverging loss) end with one line on stderr and exit
code 2, never a traceback.

Under ``torchrun --nproc_per_node W`` every rank runs :func:`main`; they join one process group
(:mod:`bgf_pyg.distributed`), check that they got the same options, draw their own P×M batches
and train one model on the global batch. Rank 0 alone prints the table and writes the run folder;
a user error is reported by every rank.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from collections.abc import Collection, Sequence

from . import distributed
from .arguments import (
    EXIT_USAGE,
    USER_ERRORS,
    OneLineParser,
    error_message,
    option_name,
    parse_config,
)
from .arguments import build_parser as build_options_parser
from .config import DATASETS, DEMO_DEFAULTS, DEMO_METHOD_DEFAULTS, Config
from .console import setup_logging
from .experiment import run
from .presets import available_presets, preset_title

PROG = "bgf-train"
DESCRIPTION = "Train and evaluate a batch-graph metric-learning method."
HELP_WIDTH = 90


def dataset_help() -> str:
    """Each dataset's folder layout and class-id split, for ``--help``."""
    lines = ["datasets (--data-root is the folder named first; the test classes are unseen):"]
    width = max(8, *(len(name) + 1 for name in DATASETS))
    for name, entry in DATASETS.items():
        text = f"{entry.cls.LAYOUT}; split: {entry.cls.SPLIT}"
        lines.append(textwrap.fill(text, HELP_WIDTH, initial_indent=f"  {name:{width}s}",
                                   subsequent_indent=" " * (width + 2), break_on_hyphens=False))
    demo = " ".join(f"{option_name(k)} {v}" for k, v in DEMO_DEFAULTS.items())
    per_method = "; ".join(
        f"{method}: " + " ".join(f"{option_name(k)} {v}" for k, v in options.items())
        for method, options in DEMO_METHOD_DEFAULTS.items())
    lines += ["", textwrap.fill("with --dataset demo (the default) these defaults change, so that "
                                "bgf-train with no options runs the demo of examples/cub.py: "
                                + demo + (f"; and per method (chosen on the validation "
                                          f"classes), {per_method}" if per_method else ""),
                                HELP_WIDTH),
              "", "the defaults shown above are those that apply with the options given (e.g. "
              "bgf-train --dataset cub --help)",
              "", "a bad option ends with one line naming it and exit code 2, before any work "
              "starts"]
    return "\n".join(lines)


def add_list_presets(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--list-presets", action="store_true",
                        help="print the presets and exit")


def list_presets(extras: dict, parser: argparse.ArgumentParser) -> None:
    """``--list-presets``: print them and exit."""
    if extras.get("list_presets"):
        print(format_presets())
        parser.exit(0)


def build_parser(prog: str = PROG, defaults: Config | None = None) -> OneLineParser:
    """The ``bgf-train`` parser, generated from :class:`~bgf_pyg.config.Config`, with the
    defaults of ``defaults`` (default: those of no options, the demo's)."""
    return build_options_parser(prog, defaults, description=DESCRIPTION, epilog=dataset_help(),
                                add_extra=add_list_presets)


def parse_args(
    argv: Sequence[str] | None = None,
    methods: Collection[str] | None = None,
    prog: str = PROG,
) -> Config:
    """Parse ``argv`` into a resolved, checked :class:`~bgf_pyg.config.Config`; a bad option
    exits with one line and code 2. ``methods``: the methods these options are used for
    (``examples/cub.py --method all``), for the option-scope check."""
    return parse_config(argv, prog=prog, methods=methods, description=DESCRIPTION,
                        epilog=dataset_help(), add_extra=add_list_presets,
                        handle_extra=list_presets)


def format_presets() -> str:
    """One line per shipped preset: its name and description."""
    names = available_presets()
    width = max(map(len, names))
    return "\n".join(f"{name:<{width}}  {preset_title(name)}" for name in names)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``bgf-train``; returns the exit code (2 for a user error)."""
    try:
        config = parse_args(argv)
    except SystemExit as exit_:  # --help (0) or a bad option (2), already printed
        return int(exit_.code or 0)
    setup_logging()
    try:
        result = run(config)
    except USER_ERRORS as err:
        where = (f"[rank {distributed.launcher_rank()}] " if distributed.launched_distributed()
                 else "")
        print(f"{PROG}: error: {where}{error_message(err, config)}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        distributed.destroy_distributed()
    if distributed.launcher_rank() == 0:
        print(result.table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
