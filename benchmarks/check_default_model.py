"""Hand-written inputs a new user would try first, answered by a built bundle at each task's one-hot
preference and at the equal preference; exits 1 if a one-hot answer is wrong.

`make serve` runs it once after building the default bundle (the answers a person sees first decide whether
they keep going; the bundle is too slow to build in CI). Needs a bundle of the default suite's tasks.

    python benchmarks/check_default_model.py .cache/bundles/starter [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

from reprmerge_core.preference import canonical_preference
from service.engine import Engine, HeadGroup

# Unambiguous inputs per task with the label any reader would give (the first two of sms_spam and
# movie_sentiment are the ones issue 10 saw the tiny bundle get wrong).
EXAMPLES: dict[str, list[tuple[str, str]]] = {
    "sms_spam": [
        ("WIN a free cruise, text now!", "spam"),
        ("Congratulations! You have won a 1000 pound prize. Call 09061701461 to claim.", "spam"),
        ("Hey, are we still meeting for lunch tomorrow?", "ham"),
        ("Sorry, I'll call you later, I'm in a meeting.", "ham"),
    ],
    "trec6": [
        ("Who wrote Hamlet?", "HUM"),
        ("How far is the moon?", "NUM"),
        ("Where is the Eiffel Tower?", "LOC"),
        ("What does NASA stand for?", "ABBR"),
        ("Why is the sky blue?", "DESC"),
        ("What is the largest animal on Earth?", "ENTY"),
    ],
    "movie_sentiment": [
        ("A dull, lifeless and boring film.", "negative"),
        ("Tedious, clumsy and painfully unfunny.", "negative"),
        ("A moving, beautifully acted masterpiece.", "positive"),
        ("Funny, warm and wonderfully entertaining from start to finish.", "positive"),
    ],
}


def check(engine: Engine) -> dict[str, Any]:
    """Every example's answer under its task's one-hot preference and under the equal preference."""
    missing = [t for t in EXAMPLES if t not in engine.tasks]
    if missing:
        raise ValueError(f"bundle has no task {', '.join(missing)}; it serves {', '.join(engine.tasks)}")
    prefs = {"equal": canonical_preference([1.0] * len(engine.tasks), engine.tasks)}
    prefs |= {f"one-hot {t}": canonical_preference({t: 1.0}, engine.tasks) for t in EXAMPLES}
    heads = dict(zip(prefs, engine.fold(list(prefs.values())), strict=True))
    kept = dict(zip(prefs, engine.quality_kept(engine.tradeoff(list(prefs.values()))), strict=True))
    texts = [text for examples in EXAMPLES.values() for text, _ in examples]
    z = engine.encode(texts)
    rows: list[dict[str, Any]] = []
    for name, head in heads.items():
        (probs,) = engine.apply(z, [HeadGroup(head, range(len(texts)))])
        i = 0
        for task, examples in EXAMPLES.items():
            for text, want in examples:
                scores = probs[i, engine.slices[task]]
                label = engine.labels[task][int(scores.argmax())]
                rows.append({"preference": name, "task": task, "text": text, "expected": want, "label": label,
                             "probability": float(scores.max()), "quality_kept": kept[name][engine.tasks.index(task)],
                             "right": label == want})
                i += 1
    own = [r for r in rows if r["preference"] == f"one-hot {r['task']}"]
    equal = [r for r in rows if r["preference"] == "equal"]
    return {"bundle_id": engine.bundle_id, "rows": rows, "one_hot_right": sum(r["right"] for r in own),
            "equal_right": sum(r["right"] for r in equal), "examples": len(texts)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--json", type=Path, default=None, help="also write the answers here")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    report = check(Engine.load(args.bundle, device="cpu"))
    print(f"{'preference':<26} {'task':<16} {'expected':<9} {'answer':<9} {'p':>5}  text")
    for r in report["rows"]:
        if r["preference"] in ("equal", f"one-hot {r['task']}"):
            mark = "" if r["right"] else "  <-- WRONG"
            print(f"{r['preference']:<26} {r['task']:<16} {r['expected']:<9} {r['label']:<9} {r['probability']:5.2f}"
                  f"  {r['text']}{mark}")
    n = report["examples"]
    print(f"hand-written examples right: {report['one_hot_right']}/{n} at each task's one-hot preference, "
          f"{report['equal_right']}/{n} at the equal preference")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0 if report["one_hot_right"] == n else 1


if __name__ == "__main__":
    sys.exit(main())
