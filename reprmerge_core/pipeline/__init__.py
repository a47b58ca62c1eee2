"""End-to-end paths to a bundle: from the built-in task suites, or from a user's own checkpoints."""

from reprmerge_core.pipeline.build import BuildConfig, build_bundle

__all__ = ["BuildConfig", "build_bundle"]
