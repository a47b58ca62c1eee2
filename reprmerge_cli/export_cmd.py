"""`reprmerge export BUNDLE --preference JSON --format onnx --out DIR`: one fixed trade-off as a standalone model."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from reprmerge_cli import HELP
from reprmerge_core.bundle import BundleError
from reprmerge_core.choices import EXPORT_FORMATS


def _preference(text: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f'--preference must be JSON, e.g. \'{{"task": 1}}\' or [1, 1] ({exc})') \
            from None


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help=HELP["export"])
    p.add_argument("bundle", type=Path, help="bundle directory")
    p.add_argument("--preference", type=_preference, required=True,
                   help='the trade-off to fold in: JSON task -> weight (tasks left out weigh 0), e.g. '
                        '\'{"sms_spam": 2, "trec6": 1}\', or a list of one weight per task')
    p.add_argument("--format", choices=EXPORT_FORMATS, default="onnx", help="output format")
    p.add_argument("--out", type=Path, required=True, help="output folder (model.onnx, tokenizer, export.json)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists (atomically)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from reprmerge_core.export import EXPORT_INFO, ONNX_FILE, export_onnx

    try:
        out = export_onnx(args.bundle, args.preference, args.out, overwrite=args.overwrite)
    except (BundleError, ValueError, FileExistsError, OSError, RuntimeError) as exc:
        print(f"export failed: {exc}", file=sys.stderr)
        return 2
    info = json.loads((out / EXPORT_INFO).read_text())
    outputs = ", ".join(o["name"] for o in info["outputs"])
    print(f"wrote {out / ONNX_FILE} (outputs {outputs}; preference {json.dumps(info['preference'])}; "
          f"onnxruntime matches the bundle to {info['check_max_abs_difference']:.1e})")
    return 0
