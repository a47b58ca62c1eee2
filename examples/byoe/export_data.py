"""Write built-in tasks as the files a user brings: `train.csv` and `test.csv` (text,label), `calibration.jsonl`.

The walk-through in the README's "Bring your own experts" needs labelled data that works offline; with your own
data, skip this script and point the next steps at your files.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from reprmerge_core.data import SplitConfig, Task, load_task, split_task


def write_labelled(path: Path, task: Task) -> None:
    """CSV with a header row and label names (what `finetune.py` and `reprmerge evaluate --test` read)."""
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows((text, task.label_names[label]) for text, label in zip(task.texts, task.labels, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("tasks", nargs="+", help="built-in task names, e.g. sms_spam trec6 movie_sentiment")
    parser.add_argument("--train", type=int, default=400, help="training texts per task (at most)")
    parser.add_argument("--calibration", type=int, default=500, help="unlabeled calibration inputs per task")
    parser.add_argument("--test", type=int, default=200, help="labelled test texts per task")
    parser.add_argument("--out", type=Path, required=True, help="one folder per task is written under it")
    args = parser.parse_args()
    config = SplitConfig(test_size=args.test, calibration_size=args.calibration, train_size=args.train)
    for name in args.tasks:
        splits = split_task(load_task(name), config)
        folder = args.out / name
        folder.mkdir(parents=True, exist_ok=True)
        write_labelled(folder / "train.csv", splits.train)
        write_labelled(folder / "test.csv", splits.test)
        with (folder / "calibration.jsonl").open("w", encoding="utf-8") as f:
            f.writelines(json.dumps({"text": text}) + "\n" for text in splits.calibration)
        print(f"{folder}: {len(splits.train)} train, {len(splits.calibration)} calibration, {len(splits.test)} test")


if __name__ == "__main__":
    main()
