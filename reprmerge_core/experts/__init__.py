"""Users' expert checkpoints: where each supported head reads (`architectures`) and reading them (`reader`)."""

from reprmerge_core.experts.architectures import SUPPORTED, HeadLayout, supported_list
from reprmerge_core.experts.reader import HEAD_FILE, ExpertSource, has_head, read_expert

__all__ = ["HEAD_FILE", "SUPPORTED", "ExpertSource", "HeadLayout", "has_head", "read_expert", "supported_list"]
