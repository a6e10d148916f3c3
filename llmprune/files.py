"""The files of a checkpoint, read and written safely: safetensors headers checked whole before any tensor is
read, JSON checked, writes atomic, output places checked before long work starts. Every damaged or unwritable
file is one LlmpruneError naming it and the fix, never a traceback."""
from __future__ import annotations

import errno
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from llmprune.errors import LlmpruneError


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def read_json(path: Path, what: str, *, kind: type = dict):
    """A JSON file that must hold a `kind` (an object by default); `what` names it in the error."""
    path = Path(path)
    try:
        data = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as exc:
        raise LlmpruneError(f"{path} is not valid JSON ({first_line(exc)}); {what} is damaged: download or write it "
                            "again.") from None
    except OSError as exc:
        raise LlmpruneError(f"could not read {path} ({exc.strerror or exc}).") from None
    if not isinstance(data, kind):
        raise LlmpruneError(f"{path} holds a JSON {type(data).__name__}, not a {kind.__name__}; {what} is damaged: "
                            "download or write it again.")
    return data


def check_writable(path: str | os.PathLike, what: str = "--out") -> Path:
    """Make sure `path` (which need not exist) can be created: its nearest existing ancestor is a directory where
    a directory can be made (tried, then removed). Called before long work, so that a read-only place, a path
    below a file or a pseudo-filesystem fails at once, by name."""
    path = Path(path).expanduser().absolute()
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise LlmpruneError(f"{what} '{path}' lies below '{parent}', which is a file; choose a path in a directory.")
    try:
        probe = tempfile.mkdtemp(prefix=".llmprune-write-check-", dir=parent)
        os.rmdir(probe)
    except OSError as exc:
        reason = {errno.EROFS: "a read-only file system", errno.EACCES: "not writable by you",
                  errno.EPERM: "not writable by you", errno.ENOENT: "a file system where directories cannot be made"
                  }.get(exc.errno, f"not writable ({exc.strerror or exc})")
        raise LlmpruneError(f"cannot write {what} '{path}': '{parent}' is {reason}; choose a writable place.") from None
    return path


WEIGHTS_STEM = "llmprune-model"  # llmprune's layout: llmprune-model.safetensors, or -00001-of-00003 shards + index
WEIGHTS_INDEX = f"{WEIGHTS_STEM}.safetensors.index.json"
INDEXES = (WEIGHTS_INDEX, "model.safetensors.index.json")


def weight_files(directory: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint: those its index names (checked: a JSON weight map of file names in
    the directory), else every *.safetensors in it."""
    directory = Path(directory)
    for name in INDEXES:
        index = directory / name
        if not index.is_file():
            continue
        try:
            weight_map = json.loads(index.read_bytes())["weight_map"]
            names = sorted(set(weight_map.values()))
            if not isinstance(weight_map, dict) or not all(isinstance(n, str) and n.endswith(".safetensors") and "/" not in n
                                                           and "\\" not in n and not n.startswith(".") for n in names):
                raise ValueError("the weight map must name .safetensors files in this directory")
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as exc:
            raise LlmpruneError(f"{index} is not a valid safetensors index ({first_line(exc)}); the checkpoint is corrupted: "
                                "download or save it again.") from None
        missing = [n for n in names if not (directory / n).is_file()]
        if missing:
            raise LlmpruneError(f"{directory}: shard {missing[0]} named by {name} is missing; download or save the "
                                "checkpoint again.")
        return [directory / n for n in names]
    return sorted(directory.glob("*.safetensors"))


def read_header(path: Path) -> dict[str, tuple[torch.dtype, tuple]]:
    """{tensor name: (dtype, shape)} of a safetensors file, from its header alone; a file that is not one, is cut
    short or lies about its sizes is a one-line error."""
    with TensorReader(path) as handle:
        return {key: (handle.dtype(key), handle.shape(key)) for key in handle.keys()}


def return_freed_memory() -> None:
    """Have glibc give freed tensors back to the system at once. Its default raises the mmap threshold after each
    large free, so tensor-sized buffers end up on the heap and stay resident after release: measured +30 MB of
    RSS per block of a 1024-wide Llama when streaming, and 1.95 GB instead of 1.12 GB peak when compressing
    SmolLM2's 538 MB checkpoint. Process-wide, so called where memory matters more than speed (large
    temporaries become fresh mappings: solves ran ~35% slower when streaming). A no-op off glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD = 1 MiB, which also fixes it (no more dynamic raising)
    except (OSError, AttributeError):
        pass


_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64", torch.int64: "I64",
           torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}
DTYPE_OF_NAME = {name: dtype for dtype, name in _DTYPES.items()}


class TensorReader:
    """A safetensors file read one tensor at a time with plain reads. A memory map (safe_open) would leave every
    page read resident in this process until closed: the whole file, beside the model, when compressing a
    checkpoint (+540 MiB of peak RSS on SmolLM2, measured). Keys come sorted, as safe_open gives them.

    The header is checked whole when the file is opened (its length, JSON, dtypes, shapes against byte ranges,
    ranges inside the file and not overlapping), so a truncated, corrupted or foreign file is one LlmpruneError
    naming it, never a crash halfway through a load."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            self._file = open(self.path, "rb")
        except OSError as exc:
            raise LlmpruneError(f"could not open {self.path} ({exc.strerror or exc}).") from None
        try:
            self._header, self._start = self._read_header()
        except BaseException:
            self._file.close()
            raise

    def _damaged(self, why: str) -> LlmpruneError:
        return LlmpruneError(f"{self.path} is not a readable safetensors file ({why}); the checkpoint is truncated or "
                             "corrupted: download or save it again.")

    def _read_header(self) -> tuple[dict, int]:
        size_of_file = os.fstat(self._file.fileno()).st_size
        head = self._file.read(8)
        if len(head) < 8:
            raise self._damaged(f"{size_of_file} bytes, too short for a header")
        size = int.from_bytes(head, "little")
        if size > min(size_of_file - 8, 100 << 20):
            raise self._damaged(f"header length {size} does not fit the file's {size_of_file} bytes")
        try:
            header = json.loads(self._file.read(size))
        except (ValueError, UnicodeDecodeError) as exc:
            raise self._damaged(f"header is not JSON: {first_line(exc)}") from None
        if not isinstance(header, dict):
            raise self._damaged("header is not a JSON object")
        header.pop("__metadata__", None)
        start, data = 8 + size, size_of_file - 8 - size
        ranges = []
        for key, entry in header.items():
            try:
                dtype = DTYPE_OF_NAME[entry["dtype"]]
                shape = [int(d) for d in entry["shape"]]
                begin, end = (int(v) for v in entry["data_offsets"])
            except (KeyError, TypeError, ValueError) as exc:
                raise self._damaged(f"entry '{key}' is malformed or has an unsupported dtype ({first_line(exc)})") from None
            if min(shape, default=0) < 0 or not 0 <= begin <= end <= data:
                raise self._damaged(f"'{key}' lies outside the file (bytes {begin}-{end} of {data})")
            if math.prod(shape) * torch.empty((), dtype=dtype).element_size() != end - begin:
                raise self._damaged(f"'{key}' holds {end - begin} bytes, its shape {shape} and dtype need another size")
            ranges.append((begin, end))
        ranges.sort()
        if any(b0 < a1 for (_, a1), (b0, _) in zip(ranges, ranges[1:])):
            raise self._damaged("tensors overlap")
        return header, start

    def __enter__(self) -> "TensorReader":
        return self

    def __exit__(self, *exc) -> None:
        self._file.close()

    def keys(self) -> list[str]:
        return sorted(self._header)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._header[key]["shape"])

    def dtype(self, key: str) -> torch.dtype:
        return DTYPE_OF_NAME[self._header[key]["dtype"]]

    def get_tensor(self, key: str) -> Tensor:
        begin, end = self._header[key]["data_offsets"]
        tensor = torch.empty(self.shape(key), dtype=self.dtype(key))
        self._file.seek(self._start + begin)
        if tensor.numel() and self._file.readinto(memoryview(tensor.reshape(-1).view(torch.uint8).numpy())) != end - begin:
            raise self._damaged(f"it ends inside {key}")
        return tensor


def write_tensors(path: Path, entries: list[tuple[str, torch.dtype, tuple, Callable[[], Tensor]]],
                  metadata: dict[str, str]) -> None:
    """Write a safetensors file holding one tensor in memory at a time: entries are (name, dtype, shape, a getter
    called once, while writing). The safetensors layout: a little-endian u64 header length, a JSON header of
    dtypes, shapes and byte offsets, then the raw data. Atomic (written aside, then renamed)."""
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name, dtype, shape, _ in entries:
        size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(len(encoded).to_bytes(8, "little"))
        handle.write(encoded)
        for name, dtype, shape, get in entries:
            x = get().detach().to("cpu").contiguous()
            if x.dtype != dtype or tuple(x.shape) != tuple(shape):
                raise ValueError(f"{name}: got {x.dtype} {tuple(x.shape)}, the header says {dtype} {tuple(shape)}")
            handle.write(x.reshape(-1).view(torch.uint8).numpy().data)
    os.replace(tmp, path)
