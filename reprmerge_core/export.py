"""`reprmerge export`: one fixed trade-off of a bundle as a standalone ONNX model that needs no reprmerge.

The output folder holds `model.onnx` (inputs `input_ids` and `attention_mask`, int64, dynamic batch and
sequence axes; one output `logits_<task>` (batch, classes) per task), the backbone's tokenizer files (with
`model_max_length` set to the bundle's `max_length`, so `tokenizer(texts, truncation=True, padding=True)`
feeds it exactly what the service does) and `export.json` (tasks, labels, preference, bundle id).
The preference's correction is folded into the heads as the service folds it (`HeadFolder` on the
bundle's own solver): logits_t = (H_t W_p) z + b_t, z the pooled encoder output.

Exported with the torch.export-based exporter (`dynamo=True`, onnxscript): with transformers 5 the
legacy TorchScript exporter (`dynamo=False`) writes a graph whose attention masking is wrong (outputs off
by ~0.5 on MiniLM, measured). Every export is checked: onnxruntime must reproduce the torch model on a
padded batch, else nothing is written.
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from reprmerge_core.artifacts import atomic_dir, check_output
from reprmerge_core.backbone import Backbone, Pooling, pool
from reprmerge_core.bundle import load_bundle
from reprmerge_core.correction import HeadFolder
from reprmerge_core.preference import Preference, canonical_preference

ONNX_FILE = "model.onnx"
EXPORT_INFO = "export.json"
INPUT_NAMES = ("input_ids", "attention_mask")
# Largest |onnxruntime - torch| accepted on the check batch: float32 kernels differ in summation order only.
CHECK_TOLERANCE = 1e-3
_CHECK_TEXTS = ("a first example input, long enough to need several tokens", "short", "a third one")
log = logging.getLogger(__name__)


def output_name(task: str) -> str:
    """The ONNX output holding `task`'s logits."""
    return f"logits_{task}"


class FixedTradeoff(torch.nn.Module):
    """Encoder, pooling and the fused heads of one preference: a tuple of per-task logits."""

    def __init__(self, encoder: torch.nn.Module, pooling: Pooling, weight: torch.Tensor, bias: torch.Tensor,
                 slices: Sequence[slice]) -> None:
        super().__init__()
        self.encoder, self.pooling, self.slices = encoder, pooling, tuple(slices)
        self.register_buffer("weight", weight.detach().float().clone())
        self.register_buffer("bias", bias.detach().float().clone())

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        z = pool(self.encoder(input_ids=input_ids, attention_mask=attention_mask), attention_mask, self.pooling)
        logits = z @ self.weight.T + self.bias
        return tuple(logits[:, s] for s in self.slices)


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter's tracing warnings and its "torchvision is not installed" log lines say nothing to a user."""
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        exporter_log.setLevel(level)


def _check(path: Path, model: FixedTradeoff, batch: Mapping[str, torch.Tensor], names: Sequence[str]) -> float:
    """Largest difference between onnxruntime on the written file and the torch model; raises above tolerance."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(list(names), {k: batch[k].numpy() for k in INPUT_NAMES})
    with torch.inference_mode():
        want = model(*(batch[k] for k in INPUT_NAMES))
    worst = max(float(np.abs(g - w.numpy()).max()) for g, w in zip(got, want))
    if not worst <= CHECK_TOLERANCE:
        raise RuntimeError(f"the exported model differs from the bundle by {worst:.2e} (> {CHECK_TOLERANCE:g}); "
                           "nothing was written")
    return worst


def export_onnx(bundle_path: str | Path, preference: Mapping[str, object] | Sequence[object], out: str | Path, *,
                overwrite: bool = False, opset: int = 18) -> Path:
    """Write the bundle's model for one `preference` (task -> weight, or one weight per task) to the folder `out`.

    The preference is validated like a request's (errors name `preference.<task>`); `out` is checked before
    any work and written atomically (never over the bundle, never over an existing folder unless `overwrite`).
    """
    try:
        import onnx  # noqa: F401  (the exporter needs both; fail before any work)
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise ValueError(f"ONNX export needs onnx, onnxscript and onnxruntime: pip install 'reprmerge[export]' "
                         f"({exc})") from None
    check_output(out, {"bundle": bundle_path}, overwrite=overwrite)
    bundle = load_bundle(bundle_path)
    m = bundle.manifest
    pref: Preference = canonical_preference(preference, bundle.task_names)
    backbone = Backbone.from_pretrained(bundle.backbone_path, pooling=m.backbone.pooling,
                                        max_length=m.backbone.max_length, device="cpu")
    fused = HeadFolder(bundle.solver(), bundle.heads).fold(torch.tensor([pref.weights], dtype=torch.float64))
    model = FixedTradeoff(backbone.model, m.backbone.pooling, fused.weight[0], fused.bias, fused.slices).eval()
    batch = backbone.collate(backbone.token_ids(list(_CHECK_TEXTS)))
    names = [output_name(t) for t in bundle.task_names]
    batch_dim, seq_dim = torch.export.Dim("batch"), torch.export.Dim("sequence")
    big = sum(p.numel() * p.element_size() for p in model.parameters()) > 1.8e9  # protobuf's 2 GB file limit
    with atomic_dir(out) as tmp, _quiet_exporter():
        torch.onnx.export(model, tuple(batch[k] for k in INPUT_NAMES), str(tmp / ONNX_FILE), dynamo=True,
                          input_names=list(INPUT_NAMES), output_names=names, opset_version=opset,
                          dynamic_shapes={k: {0: batch_dim, 1: seq_dim} for k in INPUT_NAMES},
                          external_data=big, verbose=False)
        worst = _check(tmp / ONNX_FILE, model, batch, names)
        backbone.tokenizer.model_max_length = m.backbone.max_length
        backbone.tokenizer.save_pretrained(tmp)
        info = {
            "format": "reprmerge-export", "bundle_id": m.bundle_id, "model": ONNX_FILE,
            "preference": pref.as_dict(), "inputs": list(INPUT_NAMES), "max_length": m.backbone.max_length,
            "pooling": m.backbone.pooling,
            "outputs": [{"task": t.name, "name": output_name(t.name), "labels": t.labels} for t in m.tasks],
            "check_max_abs_difference": worst,
        }
        (tmp / EXPORT_INFO).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    log.info("exported bundle %s at preference %s to %s", m.bundle_id, pref.as_dict(), out)
    return Path(out)
