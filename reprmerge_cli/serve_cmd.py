"""`reprmerge serve BUNDLE`: the preference-serving HTTP service (flags override REPRMERGE_* variables)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pydantic import ValidationError

from reprmerge_cli import HELP
from reprmerge_core.bundle import BundleError

# flag -> settings field; every one is optional so the environment fills the rest.
_FLAGS: dict[str, tuple[type, str]] = {
    "host": (str, "interface to bind"),
    "port": (int, "port to bind (0: any free port)"),
    "device": (str, "auto, cpu or cuda"),
    "max_batch_size": (int, "most texts in one backbone pass"),
    "max_batch_tokens": (int, "most padded tokens (texts x longest) in one backbone pass"),
    "max_batch_wait": (float, "seconds a batch may wait to fill while the model is busy"),
    "queue_limit": (int, "most queued requests before 429"),
    "trace_backbone": (bool, "run the backbone as a TorchScript trace, checked against eager"),
    "inline_codec_chars": (int, "requests up to this many characters are tokenised on the event loop (no thread hop)"),
    "tokenizer_threads": (int, "threads tokenising requests and rendering responses"),
    "head_cache_bytes": (int, "head cache budget in bytes"),
    "preference_grid": (int, "snap preferences to multiples of 1/grid"),
    "solve_dtype": (str, "float32 (faster, float64 where ill-conditioned) or float64 (the reference)"),
    "api_key": (str, "require `Authorization: Bearer KEY` (prefer REPRMERGE_API_KEY: flags show in ps)"),
    "max_body_bytes": (int, "largest request body"),
    "max_inputs": (int, "most texts per request"),
    "max_text_chars": (int, "longest text in characters"),
    "default_timeout": (float, "deadline in seconds when a request has no X-Request-Timeout"),
    "model_name": (str, "model name on the /v2 routes"),
    "inference_workers": (int, "backbone passes at once, each on its own thread (default: 2 on a multi-core CPU)"),
    "inference_threads": (int, "intra-op threads of each backbone pass (default: the CPUs shared among the workers)"),
    "heads_threads": (int, "intra-op threads of head solves and trade-offs"),
    "heads_queue_limit": (int, "most work items waiting for the heads thread before trade-offs get 429"),
    "fold_chunk_bytes": (int, "bound on the temporaries of one head solve or trade-off, in bytes"),
}


def _help(name: str, text: str) -> str:
    """A flag's help with the settings' default (flags default to None so the environment can fill them)."""
    from service.settings import ENV_PREFIX, ServiceSettings  # pydantic only: no FastAPI, no torch

    default = ServiceSettings.model_fields[name].default
    shown = "" if default is None or "default" in text else f"default: {default}; "
    return f"{text} ({shown}or {ENV_PREFIX}{name.upper()})"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help=HELP["serve"])
    p.add_argument("bundle", type=Path, nargs="?", help="bundle directory (or REPRMERGE_BUNDLE)")
    for name, (kind, text) in _FLAGS.items():
        if kind is bool:
            p.add_argument(f"--{name.replace('_', '-')}", dest=name, action=argparse.BooleanOptionalAction,
                           help=_help(name, text))
        else:
            p.add_argument(f"--{name.replace('_', '-')}", dest=name, type=kind, help=_help(name, text))
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"], help="log verbosity")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # Imported here: the other commands should not pay for FastAPI and uvicorn.
    from service.engine import Engine
    from service.server import serve
    from service.settings import ServiceSettings

    logging.basicConfig(level=args.log_level.upper(), format="%(message)s", stream=sys.stderr)
    overrides = {name: getattr(args, name) for name in ("bundle", *_FLAGS) if getattr(args, name) is not None}
    try:
        settings = ServiceSettings(**overrides)
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
