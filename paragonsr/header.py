"""Inspecting a ``.safetensors`` checkpoint from its header, without importing torch.

A safetensors file opens with the byte length of a JSON header that states every tensor's dtype,
shape and byte range. That header is all :func:`paragonsr.detection.detect` needs; the weights
themselves are read only to look for NaN and infinity, a few megabytes at a time through numpy.
Whatever the header does not settle - a malformed or truncated file, another network, a dtype
numpy cannot test - goes to the tensor path (:func:`paragonsr.checkpoint.inspect_checkpoint`),
which gives the one full diagnosis, so both paths answer alike.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

from .detection import (
    Inspection,
    TensorFacts,
    checked_checkpoint_file,
    detect,
    strip_common_prefix,
)
from .errors import CheckpointError

# What safetensors itself accepts as a header (its MAX_HEADER_SIZE).
MAX_HEADER_BYTES = 100_000_000
CHUNK_BYTES = 4 << 20

# dtype code -> (bytes per value, torch's name); floating point codes start with F or BF.
DTYPES = {
    "F64": (8, "torch.float64"),
    "F32": (4, "torch.float32"),
    "F16": (2, "torch.float16"),
    "BF16": (2, "torch.bfloat16"),
    "F8_E4M3": (1, "torch.float8_e4m3fn"),
    "F8_E5M2": (1, "torch.float8_e5m2"),
    "I64": (8, "torch.int64"),
    "I32": (4, "torch.int32"),
    "I16": (2, "torch.int16"),
    "I8": (1, "torch.int8"),
    "U8": (1, "torch.uint8"),
    "BOOL": (1, "torch.bool"),
}


class _Unsettled(Exception):
    """The header path cannot answer; the tensor path will."""


def inspect_file(path: str | os.PathLike[str]) -> Inspection:
    """What a checkpoint file holds: from the header for ``.safetensors`` files where it settles
    the question, otherwise (and for pickles) by loading the tensors."""
    if checked_checkpoint_file(Path(path)) == "safetensors":
        try:
            return inspect_header(path)
        except _Unsettled:
            pass
    from .checkpoint import inspect_checkpoint

    return inspect_checkpoint(path)


def inspect_header(path: str | os.PathLike[str]) -> Inspection:
    """Detection from a safetensors header, and the keys whose values are not finite. Raises
    :class:`_Unsettled` for anything the tensor path should answer instead."""
    try:
        with open(path, "rb") as file:
            size = os.fstat(file.fileno()).st_size
            entries, data_start = _read_header(file, size)
            entries = strip_common_prefix(entries)
            try:
                inspection = detect({key: _facts(entry) for key, entry in entries.items()})
            except CheckpointError:
                raise _Unsettled from None
            inspection.non_finite_keys = _non_finite_keys(file, entries, data_start)
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        raise _Unsettled from None
    inspection.source = str(path)
    return inspection


def _read_header(file, size: int) -> tuple[dict[str, dict], int]:
    """The tensor entries in data order, checked as safetensors checks them: byte ranges inside
    the file, adjoining, each as long as its dtype and shape say."""
    (length,) = struct.unpack("<Q", file.read(8))
    if not 2 <= length <= min(MAX_HEADER_BYTES, size - 8):
        raise ValueError("header length")
    header = json.loads(file.read(length).decode("utf-8"))
    if not isinstance(header, dict):
        raise ValueError("header is not an object")
    header.pop("__metadata__", None)
    entries = sorted(header.items(), key=lambda item: tuple(item[1]["data_offsets"]))
    position = 0
    for _, entry in entries:
        begin, end = entry["data_offsets"]
        shape = entry["shape"]
        if not all(isinstance(n, int) and n >= 0 for n in (*shape, begin, end)):
            raise ValueError("shape or offsets")
        if begin != position or end - begin != math.prod(shape) * DTYPES[entry["dtype"]][0]:
            raise ValueError("byte ranges")
        position = end
    if 8 + length + position != size:
        raise ValueError("data length")
    return dict(entries), 8 + length


def _facts(entry: dict) -> TensorFacts:
    code = entry["dtype"]
    return TensorFacts(tuple(entry["shape"]), DTYPES[code][1], code.startswith(("F", "BF")))


def _non_finite_keys(file, entries: dict[str, dict], data_start: int) -> list[str]:
    """Keys holding NaN or infinity, reading each tensor in chunks (memory stays a few MB
    whatever the file's size)."""
    import numpy as np

    buffer = bytearray(CHUNK_BYTES)
    found = []
    for key, entry in entries.items():
        code = entry["dtype"]
        width = DTYPES[code][0]
        begin, end = entry["data_offsets"]
        file.seek(data_start + begin)
        remaining = end - begin
        while remaining:
            count = min(remaining, CHUNK_BYTES - CHUNK_BYTES % width)
            view = memoryview(buffer)[:count]
            if file.readinto(view) != count:
                raise OSError("truncated")
            remaining -= count
            if not _all_finite(np.frombuffer(view, dtype=np.uint8), code):
                found.append(key)
                break
    return found


def _all_finite(raw, code: str) -> bool:
    import numpy as np

    if code in ("F64", "F32", "F16"):
        return bool(np.isfinite(raw.view(f"<f{DTYPES[code][0]}")).all())
    if code == "BF16":  # the upper half of a float32: all exponent bits set is inf or NaN
        return not bool(((raw.view("<u2") & 0x7F80) == 0x7F80).any())
    raise _Unsettled  # float8 and the like: torch's test is the one to trust
