"""bgf-data: prepare a dataset that installs from package registries.

    bgf-data emoji --root DIR [--size 96] [--min-styles 5] [--sets noto twemoji ...]

``emoji`` fetches the ``@iconify-json`` emoji sets with ``npm pack``, keeps the emoji that at
least ``--min-styles`` sets draw and renders them into ``DIR``
(:mod:`bgf_pyg.data.emoji_cache`), which ``bgf-train --dataset emoji --data-root DIR`` reads.
It needs npm and the ``emoji`` extra (cairosvg); a user error is one line and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from .arguments import OneLineParser
from .checks import InputError
from .data.emoji import EMOJI_SIZE, MANIFEST, read_left_out
from .data.emoji_cache import (
    EMOJI_SETS,
    MIN_STYLES,
    Fetch,
    build_emoji_cache,
    cache_state,
    npm_fetch,
)
from .options import positive_int

PROG = "bgf-data"
EXIT_USAGE = 2
#: Left-out drawings the summary names (the manifest lists all).
SUMMARY_NAMES = 10


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog=PROG, description=__doc__.splitlines()[0],
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="DATASET")
    emoji = commands.add_parser(
        "emoji", help="emoji sets of the npm registry, rendered to PNG",
        description="Fetch the @iconify-json emoji sets with npm and render every emoji that "
                    "--min-styles of them draw (one class per emoji, one image per set).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    emoji.add_argument("--root", required=True, type=Path,
                       help="folder of the cache (bgf-train --data-root); the tarballs go to "
                            "ROOT/downloads")
    emoji.add_argument("--size", type=positive_int, default=EMOJI_SIZE,
                       help="side of the rendered images, in pixels")
    emoji.add_argument("--min-styles", type=positive_int, default=MIN_STYLES,
                       help="keep an emoji drawn by at least this many of the sets")
    emoji.add_argument("--sets", nargs="+", default=list(EMOJI_SETS), metavar="SET",
                       help="@iconify-json package names")
    emoji.add_argument("--overwrite", action="store_true",
                       help="replace a cache that ROOT already holds")
    return parser


def check_args(args: argparse.Namespace) -> str | None:
    """The first problem of ``args`` found before any download, as a message, or ``None``."""
    if len(set(args.sets)) != len(args.sets):
        return f"--sets lists a set twice: {' '.join(args.sets)}"
    if args.min_styles > len(args.sets):
        return (f"--min-styles {args.min_styles} exceeds the {len(args.sets)} sets of --sets")
    if args.root.exists() and not args.root.is_dir():
        return f"--root {args.root} is not a folder"
    state = cache_state(args.root)
    if state != "empty" and not args.overwrite:
        what = "an emoji cache" if state == "complete" else "an unfinished emoji cache"
        return f"--root {args.root} already holds {what}; pass --overwrite to replace it"
    return None


def summary(records: list[dict], left_out: list[dict], seconds: float) -> str:
    """Counts of the cache just written: emoji, images, images per set, time, and the drawings
    left out (by set and icon; the manifest says why)."""
    per_set = Counter(r["style"] for r in records)
    sets = ", ".join(f"{name} {count}" for name, count in per_set.items())
    classes = len({r["class"] for r in records})
    line = f"{classes} emoji, {len(records)} images ({sets}) in {seconds:.0f} s"
    if left_out:
        names = ", ".join(f"{r['style']} {r['icon']}" for r in left_out[:SUMMARY_NAMES])
        if len(left_out) > SUMMARY_NAMES:
            names += f" and {len(left_out) - SUMMARY_NAMES} more"
        line += f"; {len(left_out)} drawings left out ({names}; see {MANIFEST} for why)"
    return line


def main(argv: Sequence[str] | None = None, fetch: Fetch = npm_fetch) -> int:
    """Entry point of ``bgf-data``; returns the exit code (2 for a user error). ``fetch`` gets
    the tarballs (``npm pack`` by default)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    problem = check_args(args)
    if problem:
        print(f"{PROG}: error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    start = time.perf_counter()
    try:
        records = build_emoji_cache(args.root, args.size, args.min_styles, args.sets,
                                    overwrite=args.overwrite, fetch=fetch,
                                    progress=lambda line: print(f"{PROG}: {line}",
                                                                file=sys.stderr))
    except (InputError, ValueError, OSError) as error:
        print(f"{PROG}: error: {' '.join(str(error).split())}", file=sys.stderr)
        return EXIT_USAGE
    left_out = read_left_out(args.root)
    print(f"{args.root}: {summary(records, left_out, time.perf_counter() - start)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
