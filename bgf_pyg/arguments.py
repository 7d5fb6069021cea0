"""The command line's view of :class:`~bgf_pyg.config.Config`: its parser, its help and its names.

:func:`build_parser` generates the argparse parser from the fields of
:class:`~bgf_pyg.config.Config` (one option per field: ``--lr-milestones`` for
``lr_milestones``, ``--no-amp`` beside ``--amp`` for a negatable switch), with the defaults of a
resolved configuration, so ``--help`` shows the default that would apply (with
``--dataset demo``, the demo's). :func:`parse_config` parses a command line into a
:class:`~bgf_pyg.config.Config`: only the options given count as set, the rest is resolved by
:func:`~bgf_pyg.config.resolve`, and every error is one line and exit code 2
(:class:`OneLineParser`). Library errors name their parameters (``samples_per_class=1``);
:func:`with_option_names` writes those as this command line's options, the one place where the
two vocabularies meet. The same holds for values: the library's domains (:mod:`bgf_pyg.domains`)
raise ``ValueError``, and :func:`argument_type` makes each an argparse ``type=`` that argparse
reports after the option (``argument --k: expected an integer >= 1, got '0'``).
"""

from __future__ import annotations

import argparse
import functools
import re
import sys
from collections.abc import Callable, Collection, Sequence
from typing import NoReturn, TypeVar

from .checks import InputError, message_in, named_parameters, show_value
from .config import OPTIONS, SCOPES, Config, option_fields, resolve
from .domains import Number
from .options import DIVERGENCE_OPTIONS, applies
from .train import DivergenceError

#: What a user can cause (bad paths, broken files, impossible settings, a diverging loss): one
#: line, exit code 2. Other errors (torch's RuntimeErrors included) are bugs and keep their
#: traceback.
USER_ERRORS = (ValueError, OSError, InputError, DivergenceError)
EXIT_USAGE = 2
HELP_FLAGS = ("-h", "--help")


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line (no usage block) and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the epilog's line breaks and appends ``(default: X)`` to every option whose default is
    a value (``None`` and switches say their default in their help text)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (default is not None and default is not False and default != argparse.SUPPRESS
                and "%(default)" not in text and action.option_strings):
            text += f" (default: {show_value(default)})"
        return text


def option_name(field: str) -> str:
    """``lr_milestones`` → ``--lr-milestones``."""
    return "--" + field.replace("_", "-")


def field_name(option: str) -> str:
    """The field of an option, with or without its leading ``--``: ``--lr-milestones`` or
    ``lr-milestones`` → ``lr_milestones`` (the inverse of :func:`option_name`)."""
    return option.removeprefix("--").replace("-", "_")


T = TypeVar("T")


def argument_type(domain: Callable[[str], T]) -> Callable[[str], T]:
    """``domain`` (the library's parser of a value's text, which raises ``ValueError``) as an
    argparse ``type=``: the same value, or argparse's ``ArgumentTypeError`` with the same text,
    which argparse prints after the option (a ``ValueError`` would print ``invalid ... value``).
    A :class:`~bgf_pyg.domains.Number` stays one, so its interval can be read off the parser."""
    if isinstance(domain, Number):
        return NumberArgument(**vars(domain))

    @functools.wraps(domain)
    def parse(text: str) -> T:
        return as_argument_error(domain, text)

    return parse


def as_argument_error(parse: Callable[[str], T], text: str) -> T:
    """``parse(text)``, its ``ValueError`` raised as argparse's ``ArgumentTypeError``."""
    try:
        return parse(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


class NumberArgument(Number):
    """A :class:`~bgf_pyg.domains.Number` as an argparse ``type=`` (:func:`argument_type`)."""

    def __call__(self, text: str) -> int | float:
        return as_argument_error(super().__call__, text)


def add_options(
    parser: argparse.ArgumentParser,
    defaults: Config | None,
    names: Collection[str] | None = None,
) -> None:
    """Add the options of :class:`~bgf_pyg.config.Config` (only ``names``, when given) to
    ``parser``, with the defaults of ``defaults`` (``None``: none, so that only the options
    given on the command line appear in the result)."""
    for f in option_fields():
        if names is not None and f.name not in names:
            continue
        spec = OPTIONS[f.name]
        default = argparse.SUPPRESS if defaults is None else getattr(defaults, f.name)
        common = {"default": default, "help": spec.help}
        if spec.switch == "on":
            parser.add_argument(option_name(f.name), action="store_true", **common)
        elif spec.switch == "on_off":
            parser.add_argument(option_name(f.name), action=argparse.BooleanOptionalAction,
                                **common)
        else:
            parse = None if spec.domain is None else argument_type(spec.domain)
            parser.add_argument(option_name(f.name), type=parse, choices=spec.choices,
                                nargs=spec.nargs, metavar=spec.metavar, **common)


def build_parser(
    prog: str,
    defaults: Config | None = None,
    *,
    description: str | None = None,
    epilog: str | None = None,
    add_extra: Callable[[argparse.ArgumentParser], None] | None = None,
) -> OneLineParser:
    """The parser of every option, showing the defaults of ``defaults`` (default: those of a
    command line with no options); ``add_extra`` adds a command's own options first."""
    parser = OneLineParser(prog=prog, description=description, epilog=epilog,
                           formatter_class=HelpFormatter)
    if add_extra is not None:
        add_extra(parser)
    add_options(parser, resolve({}, check=False) if defaults is None else defaults)
    return parser


def given_options(
    argv: Sequence[str], prog: str,
    add_extra: Callable[[argparse.ArgumentParser], None] | None = None,
) -> tuple[dict, bool]:
    """The options ``argv`` sets (converted and checked against their domains) and whether it
    asks for help; a bad value exits with one line and code 2."""
    parser = OneLineParser(prog=prog, add_help=False)
    if add_extra is not None:
        add_extra(parser)
    add_options(parser, None)
    args, unknown = parser.parse_known_args(list(argv))
    asks_help = any(a in HELP_FLAGS for a in unknown)
    unknown = [a for a in unknown if a not in HELP_FLAGS]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return vars(args), asks_help


def parse_config(
    argv: Sequence[str] | None = None,
    *,
    prog: str,
    methods: Collection[str] | None = None,
    description: str | None = None,
    epilog: str | None = None,
    add_extra: Callable[[argparse.ArgumentParser], None] | None = None,
    handle_extra: Callable[[dict, argparse.ArgumentParser], None] | None = None,
) -> Config:
    """Parse ``argv`` into a resolved, checked :class:`~bgf_pyg.config.Config`; ``--help``
    prints every option with the default that applies to the options given. A bad option exits
    with one line and code 2. ``add_extra`` / ``handle_extra``: a command's own options (they
    are removed from the options before resolving)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    given, asks_help = given_options(argv, prog, add_extra)
    extra_names = set(given) - set(OPTIONS)
    extras = {name: given.pop(name) for name in extra_names}
    if asks_help:
        try:
            shown = resolve(given, check=False)
        except InputError:
            shown = resolve({}, check=False)
        build_parser(prog, shown, description=description, epilog=epilog,
                     add_extra=add_extra).print_help()
        sys.exit(0)
    if handle_extra is not None:
        handle_extra(extras, OneLineParser(prog=prog))
    return resolve_options(given, prog, methods=methods)


def resolve_options(
    given: dict,
    prog: str,
    *,
    methods: Collection[str] | None = None,
    note: Callable[[str], None] | None = None,
) -> Config:
    """:func:`~bgf_pyg.config.resolve` in this command line's words: notes on stderr (or to
    ``note``), an error one line naming the options and exit code 2."""
    try:
        return resolve(given, methods=methods, name=option_name,
                       note=note or (lambda message: print_note(prog, message)))
    except InputError as err:
        OneLineParser(prog=prog).error(with_option_names(str(err), named_parameters(err)))


def print_note(prog: str, message: str) -> None:
    """One line on stderr about a value the run resolved differently from what was asked."""
    print(f"{prog}: note: {message}", file=sys.stderr)


def with_option_names(message: str, parameters: Collection[str]) -> str:
    """``message`` of a library error with the ``parameters`` it names (see
    :func:`~bgf_pyg.checks.naming`) written as this command's options: ``resume=True`` →
    ``--resume``, ``samples_per_class=1`` → ``--samples-per-class 1``, and a name with an
    underscore (never an English word) alone, ``classes_per_batch`` → ``--classes-per-batch``."""
    for name in parameters:
        flag = option_name(name)
        word = rf"(?<![\w\-/\\.]){name}"  # not part of a longer name, an option or a path
        message = re.sub(rf"{word}=True\b", flag, message)
        message = re.sub(rf"{word}=", f"{flag} ", message)
        if "_" in name:
            message = re.sub(rf"{word}(?![\w\-/\\]|\.\w)", flag, message)
    return message


def flag_of(name: str) -> str:
    """How this command line writes a name in a message: an option as its flag, any other name
    (``val_class_ids``) as it is."""
    return option_name(name) if name in OPTIONS else name


def error_message(err: BaseException, config: Config) -> str:
    """The one-line message of a user error, the library parameters and options it names written
    as options; a diverging loss also names the options that set the run's step size and logit
    scale."""
    message = with_option_names(" ".join(message_in(err, flag_of).split("\n")),
                                named_parameters(err))
    if isinstance(err, DivergenceError):
        options = ", ".join(f"{option_name(d)} {show_value(getattr(config, d))}"
                            for d in DIVERGENCE_OPTIONS if applies(d, config, SCOPES))
        message += (f"; the options that set this run's step size and logit scale are {options}"
                    " (a smaller learning rate usually fixes it)")
    return message
