"""Every ``strnet`` subcommand, option and positional says what it is for in ``--help``."""

from __future__ import annotations

import argparse
from collections.abc import Iterator

from strnet.cli import build_parser


def _has_help(text: str | None) -> bool:
    return bool(text and text.strip()) and text != argparse.SUPPRESS


def _walk(parser: argparse.ArgumentParser, path: str = "") -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """Yield ``(command path, parser)`` for the parser and, recursively, every subcommand's parser."""
    path = path or parser.prog
    yield path, parser
    if parser._subparsers is None:
        return
    for action in parser._subparsers._group_actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from _walk(child, f"{path} {name}")


def _missing_help(parser: argparse.ArgumentParser) -> list[str]:
    missing = []
    for path, p in _walk(parser):
        for action in p._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            name = "/".join(action.option_strings) or action.dest
            if not _has_help(action.help):
                missing.append(f"{path}: {name}")
            if isinstance(action, argparse._SubParsersAction):
                # add_parser(name, help=...) records the help as a pseudo-action; no help, no pseudo-action.
                helped = {c.dest for c in action._choices_actions if _has_help(c.help)}
                missing += [f"{path} {cmd}: subcommand has no help" for cmd in action.choices if cmd not in helped]
    return missing


def test_walk_reaches_every_subcommand() -> None:
    paths = {path for path, _ in _walk(build_parser())}
    assert {"strnet data prepare", "strnet data split", "strnet train", "strnet predict", "strnet compare"} <= paths


def test_every_subcommand_and_argument_has_help() -> None:
    missing = _missing_help(build_parser())
    assert not missing, "missing help text:\n" + "\n".join(missing)


def test_missing_help_is_detected() -> None:
    extra = argparse.ArgumentParser(prog="x")
    extra.add_argument("--undocumented")
    cmds = extra.add_subparsers(dest="cmd", help="commands")
    cmds.add_parser("bare").add_argument("thing")
    assert _missing_help(extra) == ["x: --undocumented", "x bare: subcommand has no help", "x bare: thing"]
