"""The parser every subcommand gets (one help format), and argument types shared by the subcommands:
NAME=VALUE pairs, task names, checkpoints, JSON-ish values, beta, the prior."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from reprmerge_core.checks import check_task_name, checkpoint_dir
from reprmerge_core.choices import prior_identity_weight


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """`--help` shows every option's default, except where there is none to show (None, a flag's False, an
    empty list) or the help text already says it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        default = action.default
        if default is None or default is False or default == [] or default is argparse.SUPPRESS \
                or not action.option_strings or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """An ArgumentParser with `HelpFormatter`; its subparsers are Parsers too (argparse makes them of the
    parent's class), so every subcommand, nested ones included, gets the same help."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]


def pair(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name or not value:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name, value


def json_value(text: str) -> object:
    """JSON when it parses (numbers, true/false, lists), else the plain string (e.g. basis=eigen)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def unique(pairs: list[tuple[str, str]], option: str) -> dict[str, str]:
    names = [name for name, _ in pairs]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"{option} names must be unique; repeated: {', '.join(repeated)}")
    return dict(pairs)


def weights(pairs: list[tuple[str, str]], option: str = "--weight") -> dict[str, float]:
    """Per-expert merge weights from NAME=W pairs; errors name the option and the expert."""
    result = {}
    for name, value in unique(pairs, option).items():
        try:
            result[name] = float(value)
        except ValueError:
            raise ValueError(f"{option} {name}={value}: the weight must be a number") from None
    return result


def tasks(pairs: list[tuple[str, str]], option: str) -> dict[str, str]:
    """TASK=VALUE pairs: unique task names, each valid by the one rule (`reprmerge_core.checks`)."""
    given = unique(pairs, option)
    for name, value in given.items():
        check_task_name(name, f"{option} {name}={value}")
    return given


def checkpoints(pairs: list[tuple[str, str]], option: str) -> dict[str, Path]:
    """TASK=DIR pairs of local checkpoints, checked before any work; an error names the option and pair."""
    return {name: checkpoint_dir(path, f"{option} {name}={path}") for name, path in tasks(pairs, option).items()}


def prior_value(text: str) -> float | str:
    """'auto', 'procrustes', 'identity' or an identity weight in [0, 1] (see `choose_correction`)."""
    if text == "auto":
        return text
    try:
        prior_identity_weight(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text if text in ("procrustes", "identity") else float(text)


def beta_value(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"beta must be a positive number or 'auto', got {text!r}") from None
