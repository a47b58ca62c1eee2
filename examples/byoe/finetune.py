"""Fine-tune one expert per task with plain Hugging Face code and save each as `reprmerge` takes it.

Nothing here is reprmerge's: any training (a loop like this one, `Trainer`, a script of your own) that ends in
`save_pretrained` of an `AutoModelForSequenceClassification` fine-tuned from the shared base, as safetensors,
gives an expert. Set `id2label` so the bundle answers with label names. Give every task its own seed: heads
initialised alike end up nearly parallel, and merging then pushes every task onto one class axis.
"""

from __future__ import annotations

import argparse
import csv
import random
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer


def finetune(base: Path, train: Path, out: Path, seed: int, epochs: int, batch_size: int, lr: float,
             max_length: int) -> None:
    """Train a classifier on `train` (CSV with columns text and label) from `base`; save it to `out`."""
    with train.open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    names = sorted({row["label"] for row in rows})
    texts = [row["text"] for row in rows]
    labels = torch.tensor([names.index(row["label"]) for row in rows])

    torch.manual_seed(seed)  # the new classifier's initialisation
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForSequenceClassification.from_pretrained(
        base, num_labels=len(names), id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    order = list(range(len(texts)))
    for epoch in range(epochs):
        random.Random(seed * 1000 + epoch).shuffle(order)
        total = 0.0
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            inputs = tokenizer([texts[i] for i in batch], padding=True, truncation=True, max_length=max_length,
                               return_tensors="pt")
            loss = model(**inputs, labels=labels[batch]).loss
            loss.backward()
            optimiser.step()
            optimiser.zero_grad()
            total += loss.item() * len(batch)
        print(f"{out}: epoch {epoch + 1}/{epochs}, mean loss {total / len(order):.3f}", flush=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("tasks", nargs="+", help="task names: reads DATA/TASK/train.csv, writes OUT/TASK")
    parser.add_argument("--base", type=Path, required=True, help="the local base checkpoint every expert starts from")
    parser.add_argument("--data", type=Path, required=True, help="a folder per task with train.csv (text,label)")
    parser.add_argument("--out", type=Path, required=True, help="a folder per task's expert is written under it")
    parser.add_argument("--seed", type=int, default=0, help="task i is seeded with SEED + i")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--max-length", type=int, default=64)
    args = parser.parse_args()
    for i, task in enumerate(args.tasks):
        finetune(args.base, args.data / task / "train.csv", args.out / task, args.seed + i, args.epochs,
                 args.batch_size, args.lr, args.max_length)


if __name__ == "__main__":
    main()
