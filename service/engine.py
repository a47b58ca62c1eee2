"""The model side of the service: bundle, backbone on its device, head folding, mixed-batch forward.

Synchronous and thread-confined by design: the batcher calls `tokenize`/`forward` from one
inference thread and the head cache calls `fold`/`tradeoff` from one solve thread, so the event
loop never runs tensor code.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from reprmerge_core.backbone import Backbone
from reprmerge_core.bundle import Bundle, load_bundle
from reprmerge_core.correction import CorrectionSolver, HeadFolder
from reprmerge_core.preference import Preference


@dataclass(frozen=True)
class Head:
    """The fused heads H_t W_p of one preference, all tasks stacked: logits = z @ weight.T + bias."""

    fingerprint: str
    weight: torch.Tensor  # (K, d) on the engine's device

    @property
    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()


@dataclass(frozen=True)
class HeadGroup:
    """Rows of a batch (indices into its texts) that are answered with one head."""

    head: Head
    rows: Sequence[int]


class Engine:
    """Loads a bundle once and answers mixed-preference batches from one backbone pass."""

    def __init__(self, bundle: Bundle, backbone: Backbone, folder: HeadFolder) -> None:
        self.bundle = bundle
        self.backbone = backbone
        self.folder = folder
        self.tasks: tuple[str, ...] = tuple(bundle.task_names)
        self.labels: dict[str, tuple[str, ...]] = {t.name: tuple(t.labels) for t in bundle.manifest.tasks}
        self.slices: dict[str, slice] = dict(zip(self.tasks, folder.slices))

    @classmethod
    def load(cls, path: str | Path, device: str = "auto") -> Engine:
        """Load and validate the bundle, put the backbone and the fitted solver on `device`."""
        bundle = load_bundle(path)
        m = bundle.manifest
        backbone = Backbone.from_pretrained(
            bundle.backbone_path, pooling=m.backbone.pooling, max_length=m.backbone.max_length, device=device
        )
        solver = CorrectionSolver(
            m.correction.beta, m.correction.normalisation, use_prior=m.correction.use_prior, device=backbone.device
        ).fit(bundle.statistics)
        return cls(bundle, backbone, HeadFolder(solver, bundle.heads))

    @property
    def bundle_id(self) -> str:
        return self.bundle.manifest.bundle_id

    @property
    def device(self) -> torch.device:
        return self.backbone.device

    def _pref_tensor(self, prefs: Sequence[Preference]) -> torch.Tensor:
        return torch.tensor([p.weights for p in prefs], dtype=torch.float64)

    def fold(self, prefs: Sequence[Preference]) -> list[Head]:
        """Fused heads of several preferences in one batched solve (never forms W_p)."""
        fused = self.folder.fold(self._pref_tensor(prefs))
        return [Head(p.fingerprint, fused.weight[i].contiguous()) for i, p in enumerate(prefs)]

    def tradeoff(self, prefs: Sequence[Preference]) -> torch.Tensor:
        """Closed-form per-task loss of each preference's correction, (P, T), from the statistics."""
        return self.folder.solver.tradeoff(self._pref_tensor(prefs)).cpu()

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        return self.backbone.tokenize(texts)

    @torch.inference_mode()
    def forward(self, tokens: dict[str, torch.Tensor], groups: Sequence[HeadGroup]) -> list[torch.Tensor]:
        """Class probabilities per group, (len(rows), K) on CPU: one backbone pass, one matmul per head.

        Rows sharing a head are gathered and multiplied by that head once, so the per-row cost is
        K x d whatever the number of distinct preferences; softmax is taken per task slice.
        """
        z = self.backbone.embed_tokens(tokens).float()
        bias = self.folder.bias
        logits = torch.cat([
            torch.addmm(bias, z[torch.as_tensor(g.rows, device=z.device)], g.head.weight.T) for g in groups
        ])
        probs = torch.cat([logits[:, s].softmax(dim=-1) for s in self.folder.slices], dim=1).cpu()
        return list(probs.split([len(g.rows) for g in groups]))
