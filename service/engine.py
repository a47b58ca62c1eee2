"""The model side of the service: bundle, backbone on its device, head folding, mixed-batch forward.

Synchronous and thread-confined by design: the batcher calls `encode` on one inference thread,
and `fold`, `tradeoff` and `apply` run on the heads thread (service.heads), so the event loop
never runs tensor code.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from reprmerge_core.backbone import Backbone
from reprmerge_core.bundle import Bundle, load_bundle
from reprmerge_core.correction import HeadFolder
from reprmerge_core.correction.solver import quality_kept
from reprmerge_core.preference import Preference


def torch_executor(name: str, threads: int, workers: int = 1) -> ThreadPoolExecutor:
    """`workers` threads that run torch with `threads` intra-op threads each.

    torch.set_num_threads acts on the calling thread (its OpenMP team size) and also sets the
    default that threads which start using torch later pick up: so every executor sets its own
    count in its initializer, and none inherits another's by accident.
    """
    return ThreadPoolExecutor(workers, thread_name_prefix=name, initializer=torch.set_num_threads, initargs=(threads,))


KEPT_DECIMALS = 4
"""`quality_kept` is reported to 4 decimals: a marker, and a one-hot task reads 1.0 rather than 0.99999999999
(its float32 solve in a batch of one differs from the reference solve in the last bits)."""


def _rounded(values: Sequence[float]) -> tuple[float, ...]:
    return tuple(round(v, KEPT_DECIMALS) for v in values)


class UntokenizableText(ValueError):
    """The tokenizer refused text `index` of a request (e.g. a lone UTF-16 surrogate)."""

    def __init__(self, index: int, cause: Exception) -> None:
        super().__init__(f"text {index} cannot be tokenised: {cause}")
        self.index = index


@dataclass(frozen=True)
class Head:
    """The fused heads H_t W_p of one preference, all tasks stacked: logits = z @ weight.T + bias."""

    fingerprint: str
    weight: torch.Tensor  # (K, d) on the engine's device, owning its storage

    @property
    def nbytes(self) -> int:
        """Bytes of the storage this head keeps alive: a view would pin (and count) its whole base tensor."""
        return self.weight.untyped_storage().nbytes()


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
        # Solved now, before the heads thread exists: fold and tradeoff only read them later.
        best, uncorrected = folder.solver.reference_losses()
        self.best_loss: tuple[float, ...] = tuple(best.tolist())
        self.uncorrected_loss: tuple[float, ...] = tuple(uncorrected.tolist())

    @classmethod
    def load(cls, path: str | Path, device: str = "auto", solve_dtype: str = "float64", trace: bool = False) -> Engine:
        """Load and validate the bundle, put the backbone (traced if `trace`) and the fitted solver on `device`."""
        bundle = load_bundle(path)
        m = bundle.manifest
        backbone = Backbone.from_pretrained(
            bundle.backbone_path, pooling=m.backbone.pooling, max_length=m.backbone.max_length, device=device
        )
        if trace:
            backbone.trace()
        solver = bundle.solver(backbone.device, getattr(torch, solve_dtype))
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
        """Fused heads of several preferences in one batched solve (never forms W_p: `quality_kept` needs the
        closed-form losses, which do, ~10x the fold's cost, so they come from `tradeoff` on request)."""
        fused = self.folder.fold(self._pref_tensor(prefs))
        # clone: a view of fused.weight would keep the whole (P, K, d) fold output alive per cached head.
        return [Head(p.fingerprint, fused.weight[i].clone()) for i, p in enumerate(prefs)]

    def fold_chunk(self, budget_bytes: int) -> int:
        """Most preferences one `fold` may take for its temporaries to stay within `budget_bytes` (at least 1)."""
        return max(1, budget_bytes // self.folder.fold_bytes_per_preference)

    def tradeoff(self, prefs: Sequence[Preference]) -> list[tuple[float, ...]]:
        """Closed-form per-task losses of each preference's correction, from the statistics (one row per preference)."""
        return [tuple(row) for row in self.folder.solver.tradeoff(self._pref_tensor(prefs)).tolist()]

    def quality_kept(self, losses: Sequence[Sequence[float]]) -> list[tuple[float, ...]]:
        """`quality_kept` of `tradeoff` rows: cheap (no solve), on any thread."""
        table = torch.tensor(losses, dtype=torch.float64).reshape(len(losses), len(self.tasks))
        return [_rounded(row) for row in quality_kept(table, *self.folder.solver.reference_losses()).tolist()]

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids per text, unpadded; raises `ValueError` naming the first text the tokenizer refuses."""
        try:
            return self.backbone.token_ids(texts)
        except Exception:  # find the culprit: one bad text must not hide behind the request
            for i, text in enumerate(texts):
                try:
                    self.backbone.token_ids([text])
                except Exception as exc:
                    raise UntokenizableText(i, exc) from exc
            raise

    @torch.inference_mode()
    def embed(self, rows: Sequence[Sequence[int]]) -> torch.Tensor:
        """Pad token-id rows into one batch and run the backbone: pooled representations (len(rows), d), float32."""
        return self.backbone.embed_tokens(self.backbone.collate(rows)).float()

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """Tokenise and run the backbone: pooled representations (len(texts), d), float32."""
        return self.embed(self.token_ids(texts))

    @torch.inference_mode()
    def apply(self, z: torch.Tensor, groups: Sequence[HeadGroup]) -> list[torch.Tensor]:
        """Class probabilities per group, (len(rows), K) on CPU: one matmul per distinct head.

        Rows sharing a head are gathered and multiplied by that head once, so the per-row cost is
        K x d whatever the number of distinct preferences; softmax is taken per task slice.
        """
        bias = self.folder.bias
        logits = torch.cat([
            torch.addmm(bias, z[torch.as_tensor(g.rows, device=z.device)], g.head.weight.T) for g in groups
        ])
        probs = torch.cat([logits[:, s].softmax(dim=-1) for s in self.folder.slices], dim=1).cpu()
        return list(probs.split([len(g.rows) for g in groups]))
