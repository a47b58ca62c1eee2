"""reprmerge core library: merging, ReACT statistics, closed-form solves, bundles, evaluation."""

__version__ = "0.1.0"
