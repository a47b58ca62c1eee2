"""The real text tasks of data.md, read from registry packages' files, deduplicated and split."""

from reprmerge_core.data.sources import normalise
from reprmerge_core.data.splits import (
    DEFAULT_SUITE,
    SUITES,
    SplitConfig,
    SuiteConfig,
    TaskSplits,
    load_suite,
    resolve_suite,
    split_task,
)
from reprmerge_core.data.tasks import TASK_NAMES, Task, deduplicate, load_task

__all__ = [
    "DEFAULT_SUITE",
    "SUITES",
    "TASK_NAMES",
    "SplitConfig",
    "SuiteConfig",
    "Task",
    "TaskSplits",
    "deduplicate",
    "load_suite",
    "load_task",
    "normalise",
    "resolve_suite",
    "split_task",
]
