"""`reprmerge serve BUNDLE`: the preference-serving HTTP service (flags override REPRMERGE_* variables).

The flags are generated from `service.settings.ServiceSettings` (one home): every setting has one, with the
setting's type, choices, description and default, so a new setting cannot be forgotten here.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import ValidationError
from pydantic.fields import FieldInfo

from reprmerge_cli import HELP
from reprmerge_core.bundle import BundleError
from service.settings import ENV_PREFIX, ServiceSettings  # pydantic only: FastAPI and uvicorn wait for `run`

_POSITIONAL = "bundle"


def _argument(name: str, field: FieldInfo) -> dict[str, Any]:
    """argparse keywords for the settings field `name`: its type (or choices), its description, its default."""
    annotation = field.annotation
    if get_origin(annotation) in (Union, UnionType):  # `X | None`: the flag takes an X
        (annotation,) = [a for a in get_args(annotation) if a is not type(None)]
    default = "unset" if field.default is None else field.default
    text = f"{field.description or name.replace('_', ' ')} (default: {default}; env {ENV_PREFIX}{name.upper()})"
    kwargs: dict[str, Any] = {"dest": name, "help": text.replace("%", "%%")}
    if annotation is bool:
        return {**kwargs, "action": argparse.BooleanOptionalAction}
    if get_origin(annotation) is Literal:
        choices = list(get_args(annotation))
        return {**kwargs, "type": type(choices[0]), "choices": choices}
    if annotation in (str, int, float):
        return {**kwargs, "type": annotation}
    return {**kwargs, "type": str}  # Path, SecretStr: pydantic converts the text


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help=HELP["serve"],
                       description=f"Every option is a service setting; flags override {ENV_PREFIX}* variables.")
    p.add_argument(_POSITIONAL, type=Path, nargs="?", help=f"bundle directory (or {ENV_PREFIX}BUNDLE)")
    for name, field in ServiceSettings.model_fields.items():
        if name != _POSITIONAL:
            p.add_argument(f"--{name.replace('_', '-')}", **_argument(name, field))
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"], help="log verbosity")
    p.set_defaults(func=run)


def settings_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given on the command line; the environment and the defaults fill the rest."""
    return {name: getattr(args, name) for name in ServiceSettings.model_fields if getattr(args, name) is not None}


def run(args: argparse.Namespace) -> int:
    # Imported here: the other commands should not pay for FastAPI and uvicorn.
    from service.engine import Engine
    from service.server import serve

    logging.basicConfig(level=args.log_level.upper(), format="%(message)s", stream=sys.stderr)
    try:
        settings = ServiceSettings(**settings_overrides(args))
    except ValidationError as exc:
        print(f"invalid settings:\n{exc}", file=sys.stderr)
        return 2
    try:
        engine = Engine.load(settings.bundle, device=settings.device, solve_dtype=settings.solve_dtype,
                             trace=settings.trace_backbone)
    except (BundleError, ValueError) as exc:
        print(f"cannot serve {settings.bundle}: {exc}", file=sys.stderr)
        return 1
    serve(settings, engine)
    return 0
