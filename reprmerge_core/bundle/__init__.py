"""Versioned, integrity-checked bundles: a merged backbone, per-task statistics and task heads."""

from reprmerge_core.bundle.io import Bundle, BundleError, load_bundle, write_bundle
from reprmerge_core.bundle.manifest import FORMAT_VERSION, Manifest, TaskInfo

__all__ = ["FORMAT_VERSION", "Bundle", "BundleError", "Manifest", "TaskInfo", "load_bundle", "write_bundle"]
