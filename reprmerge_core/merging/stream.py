"""Checkpoints read and written one tensor at a time (the safetensors format), so a data-free merge holds one
parameter's K + 1 tensors and their float64 task vectors, never K + 1 models.

`LazyCheckpoint` maps the encoder's parameter names (those of `AutoModel`, built on the meta device so no
weights are allocated) to the tensors in a checkpoint's safetensors file(s), lazily: a classification
checkpoint's `bert.`-style prefix is stripped and its head ignored, as `AutoModel.from_pretrained` does.
`write_checkpoint` writes the safetensors format directly (8-byte header length, JSON header, then each
tensor's bytes in order), so merged tensors go to disk as they are produced.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from transformers import AutoConfig, AutoModel, PretrainedConfig

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# safetensors' dtype names (header "dtype") of the torch dtypes a checkpoint holds.
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
# Names older BERT-style checkpoints use for LayerNorm parameters, renamed on load by transformers too.
LEGACY_SUFFIXES = ((".gamma", ".weight"), (".beta", ".bias"))


@dataclass(frozen=True)
class EncoderLayout:
    """The parameter names (in `state_dict` order) and shapes of the encoder a config describes."""

    config: PretrainedConfig
    shapes: dict[str, tuple[int, ...]]
    prefix: str  # base_model_prefix, e.g. "bert": how a task model's checkpoint names the encoder
    model_class: str
    linear_layers: tuple[str, ...]  # names of the nn.Linear modules (their weights are `name.weight`)


def encoder_layout(checkpoint: str | Path) -> EncoderLayout:
    """The encoder of `checkpoint`'s config, built on the meta device: names and shapes, no weights."""
    config = AutoConfig.from_pretrained(checkpoint, local_files_only=True)
    with torch.device("meta"):
        model = AutoModel.from_config(config)
    linear = tuple(name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear))
    return EncoderLayout(
        config, {name: tuple(t.shape) for name, t in model.state_dict().items()}, model.base_model_prefix,
        type(model).__name__, linear,
    )


def weight_files(checkpoint: Path) -> list[Path]:
    """The checkpoint's safetensors file, or its shards (from the index)."""
    if (checkpoint / WEIGHTS_FILE).is_file():
        return [checkpoint / WEIGHTS_FILE]
    if (checkpoint / INDEX_FILE).is_file():
        weight_map = json.loads((checkpoint / INDEX_FILE).read_text(encoding="utf-8"))["weight_map"]
        return [checkpoint / name for name in sorted(set(weight_map.values()))]
    raise FileNotFoundError(f"{checkpoint} holds no {WEIGHTS_FILE} (nor {INDEX_FILE}): merges read safetensors")


def _encoder_name(key: str, prefix: str, names: Mapping[str, object]) -> str | None:
    """The encoder parameter a file key holds, or None (a head, a buffer the encoder does not keep)."""
    for candidate in (key, key.removeprefix(f"{prefix}.")):
        if candidate in names:
            return candidate
        for old, new in LEGACY_SUFFIXES:
            if candidate.endswith(old) and candidate[: -len(old)] + new in names:
                return candidate[: -len(old)] + new
    return None


class SafetensorsFile:
    """One safetensors file's header, and its tensors read with plain file reads.

    Not `safetensors.safe_open`: that maps the whole file, and every page a read touches stays in the
    process's resident memory while the handle is open, so reading K + 1 checkpoints through it costs
    their size in RSS again. A plain read leaves the pages to the OS's file cache.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        with path.open("rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        header.pop("__metadata__", None)
        self.start = 8 + size
        self.entries: dict[str, dict] = header

    def dtype_name(self, key: str) -> str:
        return self.entries[key]["dtype"]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.entries[key]["shape"])

    def read(self, key: str) -> Tensor:
        begin, end = self.entries[key]["data_offsets"]
        dtype, shape = DTYPES[self.dtype_name(key)], self.shape(key)
        if end == begin:
            return torch.empty(shape, dtype=dtype)
        buffer = bytearray(end - begin)
        with self.path.open("rb") as f:
            f.seek(self.start + begin)
            if f.readinto(buffer) != len(buffer):
                raise ValueError(f"{self.path}: truncated data for tensor {key}")
        return torch.frombuffer(buffer, dtype=dtype).reshape(shape)


class LazyCheckpoint(Mapping[str, Tensor]):
    """The encoder tensors of one checkpoint, each read from disk when asked for (a fresh CPU tensor each time).

    Iterates in the layout's order over the parameters the files hold; `meta()` gives shapes and dtypes
    without reading any data (for compatibility checks).
    """

    def __init__(self, checkpoint: str | Path, layout: EncoderLayout) -> None:
        self.path = Path(checkpoint)
        self._where: dict[str, tuple[SafetensorsFile, str]] = {}
        for file in weight_files(self.path):
            stored = SafetensorsFile(file)
            for key in stored.entries:
                name = _encoder_name(key, layout.prefix, layout.shapes)
                if name is not None:
                    self._where[name] = (stored, key)
        self._names = [name for name in layout.shapes if name in self._where]

    def __getitem__(self, name: str) -> Tensor:
        if name not in self._where:
            raise KeyError(name)
        stored, key = self._where[name]
        return stored.read(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def dtype_name(self, name: str) -> str:
        stored, key = self._where[name]
        return stored.dtype_name(key)

    def meta(self) -> dict[str, Tensor]:
        """name -> an empty meta tensor of the stored shape and dtype."""
        return {
            name: torch.empty(stored.shape(key), dtype=DTYPES[stored.dtype_name(key)], device="meta")
            for name, (stored, key) in self._where.items()
        }


def layout_problems(layout: EncoderLayout, base: LazyCheckpoint) -> list[str]:
    """Parameters the base's files lack, or store with another shape than its config's encoder has."""
    missing = [name for name in layout.shapes if name not in base]
    problems = [f"base {base.path} lacks parameters: {', '.join(missing)}"] if missing else []
    meta = base.meta()
    return problems + [
        f"parameter {name}: base file shape {tuple(meta[name].shape)} vs config shape {shape}"
        for name, shape in layout.shapes.items()
        if name in meta and tuple(meta[name].shape) != shape
    ]


def write_checkpoint(path: Path, entries: Mapping[str, tuple[str, tuple[int, ...]]],
                     tensors: Iterable[tuple[str, Tensor]]) -> None:
    """Write a safetensors file from `tensors`, consumed one at a time in the order of `entries`
    (name -> (dtype name, shape)); every tensor is checked against its entry before its bytes are written."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, (dtype, shape) in entries.items():
        size = DTYPES[dtype].itemsize * int(torch.Size(shape).numel())
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # tensor data starts 8-byte aligned, as safetensors writes it
    expected = iter(entries.items())
    with path.open("wb") as out:
        out.write(struct.pack("<Q", len(encoded)))
        out.write(encoded)
        for name, tensor in tensors:
            wanted, (dtype, shape) = next(expected, (None, ("", ())))
            if name != wanted or tensor.dtype != DTYPES[dtype] or tuple(tensor.shape) != tuple(shape):
                raise ValueError(f"tensor {name} {tensor.dtype} {tuple(tensor.shape)} does not match the header "
                                 f"entry {wanted} {dtype} {shape}")
            out.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
        if next(expected, None) is not None:
            raise ValueError(f"{path}: fewer tensors than header entries")
