"""Real labelled text tasks, deduplicated, as immutable `Task` objects."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from reprmerge_core.data.sources import SOURCES, RawExamples, normalise

TASK_NAMES: tuple[str, ...] = tuple(SOURCES)


@dataclass(frozen=True)
class Task:
    """A classification task: texts with integer labels indexing `label_names`."""

    name: str
    label_names: tuple[str, ...]
    texts: tuple[str, ...]
    labels: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.labels):
            raise ValueError(f"task {self.name!r}: {len(self.texts)} texts but {len(self.labels)} labels")
        bad = [y for y in self.labels if not 0 <= y < len(self.label_names)]
        if bad:
            raise ValueError(f"task {self.name!r}: label ids {sorted(set(bad))} outside 0..{len(self.label_names) - 1}")

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    def subset(self, indices: Iterable[int]) -> Task:
        """The examples at `indices`, in that order."""
        idx = list(indices)
        return Task(self.name, self.label_names, tuple(self.texts[i] for i in idx), tuple(self.labels[i] for i in idx))


def deduplicate(examples: RawExamples) -> RawExamples:
    """First occurrence of each normalised text; texts seen with more than one label are dropped entirely.

    Done before splitting so that no text (up to case and spacing) can sit in two splits.
    """
    first: dict[str, tuple[str, str]] = {}
    conflicting: set[str] = set()
    for text, label in examples:
        key = normalise(text)
        if not key:
            continue
        if key not in first:
            first[key] = (text, label)
        elif first[key][1] != label:
            conflicting.add(key)
    return [pair for key, pair in first.items() if key not in conflicting]


def check_task_name(name: str) -> str:
    """The name itself, or a ValueError listing the known tasks."""
    if name not in SOURCES:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASK_NAMES)}")
    return name


def load_task(name: str) -> Task:
    """All deduplicated examples of a known task, in file order (see data.md for sources and counts)."""
    source = SOURCES[check_task_name(name)]
    label_ids = {label: i for i, label in enumerate(source.labels)}
    examples = deduplicate(source.read())
    return Task(name, source.labels, tuple(t for t, _ in examples), tuple(label_ids[y] for _, y in examples))
