"""Train (or fetch from the cache) a suite's experts and report their test accuracy and timing.

    python -m reprmerge_core.training tiny [--cache-dir DIR] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from reprmerge_core.data import SUITES, load_suite
from reprmerge_core.training.evaluate import evaluate_head
from reprmerge_core.training.expert import train_experts
from reprmerge_core.training.recipe import RECIPES


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(prog="python -m reprmerge_core.training", description=__doc__.splitlines()[0])
    parser.add_argument("suite", choices=sorted(SUITES))
    parser.add_argument(
        "--cache-dir", type=Path, default=None, help="default: $REPRMERGE_CACHE or ~/.cache/reprmerge/experts"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the report here")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    suite = load_suite(args.suite)
    experts = train_experts(suite, RECIPES[args.suite], cache_dir=args.cache_dir)
    build_seconds = time.perf_counter() - start
    rows = []
    for splits, expert in zip(suite, experts, strict=True):
        test = splits.test
        result = evaluate_head(expert.backbone(), expert.head, test.texts, test.labels, progress=f"test {splits.name}")
        rows.append({
            "task": splits.name,
            "test_accuracy": result.accuracy,
            "test_macro_f1": result.macro_f1,
            "train_seconds": expert.info["train_seconds"],
            "trained_now": expert.trained,
            "path": str(expert.path),
        })
    total_seconds = time.perf_counter() - start
    report = {"suite": args.suite, "build_seconds": build_seconds, "total_seconds": total_seconds, "experts": rows}
    for row in rows:
        print(f"{row['task']:>16}  acc {row['test_accuracy']:.3f}  macro-F1 {row['test_macro_f1']:.3f}  "
              f"train {row['train_seconds']:.1f} s  {'trained' if row['trained_now'] else 'cached'}")
    print(f"build (load data + train) {build_seconds:.1f} s, with test evaluation {total_seconds:.1f} s")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
