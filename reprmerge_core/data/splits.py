"""Fixed, disjoint train / calibration / test splits and the named task suites.

Per task the deduplicated examples are shuffled with `seed`; the first `test_size` are the test
split, the next `calibration_size` the calibration split (its inputs are only ever used without
labels, to fit ReACT statistics), and the next up to `train_size` the training split.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, field_validator

from reprmerge_core.data.tasks import Task, check_task_name, load_task


class SplitConfig(BaseModel):
    """Split sizes per task; `train_size` is an upper bound, test and calibration sizes are exact."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    test_size: int = Field(default=500, ge=1)
    calibration_size: int = Field(default=500, ge=0)
    train_size: int = Field(default=2000, ge=1)
    seed: int = 0


@dataclass(frozen=True)
class TaskSplits:
    """One task's three disjoint splits; calibration keeps texts only so labels cannot leak into it."""

    train: Task
    calibration: tuple[str, ...]
    test: Task
    config: SplitConfig

    @property
    def name(self) -> str:
        return self.train.name

    @property
    def label_names(self) -> tuple[str, ...]:
        return self.train.label_names


def split_task(task: Task, config: SplitConfig) -> TaskSplits:
    """Shuffle with `config.seed`, then test, calibration and train slices in that order."""
    needed = config.test_size + config.calibration_size + 1
    if len(task) < needed:
        raise ValueError(
            f"task {task.name!r} has {len(task)} examples; test_size + calibration_size + 1 training "
            f"example need {needed}"
        )
    order = list(range(len(task)))
    random.Random(config.seed).shuffle(order)
    cal_end = config.test_size + config.calibration_size
    return TaskSplits(
        train=task.subset(order[cal_end : cal_end + config.train_size]),
        calibration=task.subset(order[config.test_size : cal_end]).texts,
        test=task.subset(order[: config.test_size]),
        config=config,
    )


class SuiteConfig(BaseModel):
    """Which tasks, split how; validated on construction so a bad request fails before any work."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tasks: tuple[str, ...] = Field(min_length=1)
    split: SplitConfig = SplitConfig()

    @field_validator("tasks")
    @classmethod
    def _known_and_distinct(cls, tasks: tuple[str, ...]) -> tuple[str, ...]:
        for name in tasks:
            check_task_name(name)
        repeated = sorted({name for name in tasks if tasks.count(name) > 1})
        if repeated:
            raise ValueError(f"tasks listed more than once: {', '.join(repeated)}")
        return tasks


SUITES: dict[str, SuiteConfig] = {
    # data.md's tiny variant: small enough to build experts and all in about a minute on 2 CPU cores.
    # 500 calibration inputs per task: fewer than the representation size (384) leave the statistics
    # rank-deficient and the correction weaker; collecting them costs ~20 s here.
    "tiny": SuiteConfig(
        tasks=("sms_spam", "trec6", "movie_sentiment"),
        split=SplitConfig(test_size=200, calibration_size=500, train_size=256),
    ),
    # What `make serve` builds (DEFAULT_SUITE): the tiny tasks with text6's splits, so that the experts reach
    # >= 0.90 mean test accuracy and get obvious hand-written inputs right, in ~4-5 minutes of CPU here.
    "starter": SuiteConfig(
        tasks=("sms_spam", "trec6", "movie_sentiment"),
        split=SplitConfig(test_size=500, calibration_size=500, train_size=2000),
    ),
    # data.md's six-task pilot.
    "text6": SuiteConfig(
        tasks=("sms_spam", "trec6", "bbc_news", "movie_sentiment", "tweet_sentiment", "subjectivity"),
        split=SplitConfig(test_size=500, calibration_size=500, train_size=2000),
    ),
}


DEFAULT_SUITE = "starter"
"""The suite of the embedded default bundle (`make serve`, the Docker image); CI tests build `tiny` instead."""


def resolve_suite(spec: str | Sequence[str] | SuiteConfig, split: SplitConfig | None = None) -> SuiteConfig:
    """A suite name, a list of task names or a config; `split` overrides its split (default `SplitConfig()`)."""
    if isinstance(spec, str):
        if spec not in SUITES:
            raise ValueError(f"unknown suite {spec!r}; known suites: {', '.join(SUITES)} (or a list of task names)")
        spec = SUITES[spec]
    if isinstance(spec, SuiteConfig):
        return spec if split is None else SuiteConfig(tasks=spec.tasks, split=split)
    return SuiteConfig(tasks=tuple(spec), split=split or SplitConfig())


def load_suite(spec: str | Sequence[str] | SuiteConfig, split: SplitConfig | None = None) -> list[TaskSplits]:
    """Load and split every task of a suite (see `resolve_suite`), in the suite's order."""
    suite = resolve_suite(spec, split)
    return [split_task(load_task(name), suite.split) for name in suite.tasks]
