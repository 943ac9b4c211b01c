"""safetensors files: locate (single, sharded, folder), inspect, load into a dtype/device, save atomically.

Only safetensors are read: no pickle is ever loaded.
"""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path
from typing import Callable, Iterable

import torch
from safetensors import safe_open

from ..errors import UserError
from ..fileio import SAFETENSORS_DTYPES

SHARD_RE = re.compile(r"^(?P<stem>.+)-(?P<idx>\d{5})-of-(?P<total>\d{5})\.safetensors$")
FP8_DTYPES = {getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz") if hasattr(torch, n)}
FP8_MARKER_KEYS = ("scaled_fp8", "weight_scale", "scale_weight", "input_scale", "comfy_quant")


def resolve_files(path: str | os.PathLike, option: str, subfolder: str | None = None) -> list[Path]:
    """The safetensors files behind --option PATH: one file, every shard of a sharded set, or a folder's files."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{option}: file not found: {p}")
    if p.is_dir():
        if subfolder and (p / subfolder).is_dir() and not list(p.glob("*.safetensors")):
            p = p / subfolder
        files = sorted(p.glob("*.safetensors"))
        if not files:
            raise UserError(f"{option}: no .safetensors files in folder {p}")
        return files
    if p.suffix != ".safetensors":
        raise UserError(f"{option}: {p} is not a .safetensors file (pickled .bin/.pt/.ckpt files are not loaded; convert it)")
    m = SHARD_RE.match(p.name)
    if not m:
        return [p]
    total = int(m["total"])
    files = [p.with_name(f"{m['stem']}-{i:05d}-of-{total:05d}.safetensors") for i in range(1, total + 1)]
    missing = [f.name for f in files if not f.exists()]
    if missing:
        raise UserError(f"{option}: sharded checkpoint {p} is incomplete, missing {', '.join(missing)}")
    return files


def read_header(files: Iterable[Path]) -> tuple[dict[str, tuple[int, ...]], dict[str, torch.dtype], dict[str, str]]:
    """Key -> shape and key -> dtype for all files, plus the first file's metadata, without reading tensor data."""
    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, torch.dtype] = {}
    metadata: dict[str, str] = {}
    for f in files:
        with open(f, "rb") as fh:
            parse_header(fh, f)
        try:
            with safe_open(str(f), framework="pt") as sf:
                metadata = metadata or (sf.metadata() or {})
                for k in sf.keys():
                    sl = sf.get_slice(k)
                    shapes[k] = tuple(sl.get_shape())
                    dtypes[k] = SAFETENSORS_DTYPES.get(sl.get_dtype(), torch.float32)
        except UserError:
            raise
        except Exception as e:  # safetensors raises its own error types for truncated or foreign files
            raise UserError(f"cannot read {f}: not a valid safetensors file ({type(e).__name__}: {e})") from None
    return shapes, dtypes, metadata


def refuse_fp8(files: list[Path], dtypes: dict[str, torch.dtype], option: str, instead: str) -> None:
    """Files that are already quantised to fp8 lose precision we cannot recover; ask for the bf16 file."""
    fp8 = [k for k, d in dtypes.items() if d in FP8_DTYPES]
    marker = [k for k in dtypes if any(k.endswith(m) or k == m for m in FP8_MARKER_KEYS)]
    if fp8 or marker:
        raise UserError(
            f"{option}: {files[0]} is already fp8-quantised (fp8_scaled / fp8_e4m3fn / fp8mixed), which cannot be used; "
            f"download {instead} instead (use --fp8_base/--fp8_scaled to quantise at load time)"
        )


def parse_header(f, path: Path) -> tuple[dict, int]:
    """(header dict, data start offset) of an open safetensors file; random bytes, a cut header or a truncated file
    are one clear error naming the file."""
    size = os.fstat(f.fileno()).st_size
    raw = f.read(8)
    bad = f"{path} is not a valid safetensors file"
    if len(raw) < 8:
        raise UserError(f"{bad} (only {size} bytes); download or write it again")
    n = struct.unpack("<Q", raw)[0]
    if n > size - 8 or n > 100_000_000:
        raise UserError(f"{bad} (header length {n} but the file has {size} bytes: cut off, or not safetensors); "
                        "download or write it again")
    try:
        header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        data_size = size - 8 - n
        for k, v in header.items():
            if k == "__metadata__":
                continue
            start, end = v["data_offsets"]
            if end > data_size:
                raise UserError(f"{path} is truncated (tensor {k} ends at byte {end} of {data_size}); download or "
                                "write it again")
    except UserError:
        raise
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise UserError(f"{bad} (unreadable header: {type(e).__name__}); download or write it again") from None
    return header, 8 + n


def iter_file_tensors(path: Path):
    """Yield (key, tensor) from a safetensors file with plain reads, one tensor at a time, in file order: no memory
    map, so resident memory holds only the tensors the caller keeps."""
    with open(path, "rb") as f:
        header, base = parse_header(f, path)
        for key, info in _entries(header, path):
            t = torch.empty(info["shape"], dtype=SAFETENSORS_DTYPES[info["dtype"]])
            start, end = info["data_offsets"]
            if end > start:
                f.seek(base + start)
                buf = memoryview(t.reshape(-1).view(torch.uint8).numpy())
                if f.readinto(buf) != end - start:
                    raise UserError(f"{path}: file is truncated (tensor {key}); download it again")
            yield key, t


def _entries(header: dict, path: Path) -> list[tuple[str, dict]]:
    """The header's tensors in file order, each dtype checked."""
    entries = sorted(((k, v) for k, v in header.items() if k != "__metadata__"), key=lambda kv: kv[1]["data_offsets"][0])
    for key, info in entries:
        if info["dtype"] not in SAFETENSORS_DTYPES:
            raise UserError(f"{path}: tensor {key} has unsupported dtype {info['dtype']}")
    return entries


MADV_POPULATE_READ = 22  # map every page of the file, read-only faults (no copy); not in the mmap module yet


def _advise(m, option: int) -> bool:
    try:
        m.madvise(option)
        return True
    except (OSError, ValueError, AttributeError):
        return False


class MappedFile:
    """A safetensors file mapped copy-on-write (MAP_PRIVATE): its tensors are views of the page cache, so a tensor
    kept in the file's dtype on the CPU costs no copy and no fresh memory (its pages are the file's), and a
    converted one reads its source pages once and gives them back (MADV_DONTNEED) as soon as it is converted.
    Writing into a kept tensor (training) copies only the pages written; the file never changes. `populate` maps the
    whole file up front in the kernel (MADV_POPULATE_READ: about what `cat` costs, no copy; MAP_POPULATE would copy
    every page of a writable private mapping)."""

    def __init__(self, path: Path, populate: bool = False):
        import mmap

        self.path = path
        with open(path, "rb") as f:
            self.header, self.base = parse_header(f, path)
            size = os.fstat(f.fileno()).st_size
            self.map = mmap.mmap(f.fileno(), size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self.page = mmap.PAGESIZE
        if populate and not _advise(self.map, MADV_POPULATE_READ):  # Linux 5.14+; MAP_POPULATE would copy (COW)
            _advise(self.map, getattr(mmap, "MADV_WILLNEED", -1))
        elif not populate:
            _advise(self.map, getattr(mmap, "MADV_SEQUENTIAL", -1))  # aggressive read-ahead for the in-order walk

    def entries(self) -> list[tuple[str, dict]]:
        return _entries(self.header, self.path)

    def view(self, info: dict) -> torch.Tensor:
        """The tensor as it lies in the file (no copy)."""
        dtype = SAFETENSORS_DTYPES[info["dtype"]]
        start, end = info["data_offsets"]
        if end == start:
            return torch.empty(info["shape"], dtype=dtype)
        raw = torch.frombuffer(self.map, dtype=torch.uint8, count=end - start, offset=self.base + start)
        if (self.base + start) % dtype.itemsize:  # not aligned for its dtype (the format does not promise it)
            raw = raw.clone()
        return raw.view(dtype).reshape(info["shape"])

    def release(self, info: dict) -> None:
        """Give back the source pages of a converted tensor (whole pages inside its byte range only)."""
        import mmap

        start, end = (self.base + o for o in info["data_offsets"])
        first, last = -(-start // self.page) * self.page, end // self.page * self.page
        if last > first and hasattr(mmap, "MADV_DONTNEED"):
            self.map.madvise(mmap.MADV_DONTNEED, first, last - first)


class CudaStager:
    """File bytes -> GPU through two pinned staging buffers: the CPU fills one while the previous one's asynchronous
    copy runs; conversion (dtype, fp8) then happens on the GPU."""

    def __init__(self, device: torch.device, size: int = 64 << 20):
        self.device, self.size = device, size
        self.buffers = [torch.empty(size, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
        self.done = [None, None]
        self.turn = 0

    def to_device(self, src: torch.Tensor) -> torch.Tensor:
        out = torch.empty(src.shape, dtype=src.dtype, device=self.device)
        flat_src, flat_out = src.reshape(-1).view(torch.uint8), out.reshape(-1).view(torch.uint8)
        for o in range(0, flat_src.numel(), self.size):
            n = min(self.size, flat_src.numel() - o)
            k, self.turn = self.turn, 1 - self.turn
            if self.done[k] is not None:
                self.done[k].synchronize()  # that buffer's previous copy has left it
            self.buffers[k][:n].copy_(flat_src[o:o + n])
            flat_out[o:o + n].copy_(self.buffers[k][:n], non_blocking=True)
            self.done[k] = torch.cuda.Event()
            self.done[k].record()
        return out

    def finish(self) -> None:
        for e in self.done:
            if e is not None:
                e.synchronize()


def load_tensors(
    files: list[Path],
    dtype: torch.dtype | None,
    device: str | torch.device = "cpu",
    key_map: Callable[[str], str | None] = lambda k: k,
    disable_mmap: bool = False,
    transform: Callable[[str, torch.Tensor], dict[str, torch.Tensor]] | None = None,
) -> dict[str, torch.Tensor]:
    """Read every tensor, rename it with key_map (None drops it) and convert it straight to dtype/device.

    Each file is memory-mapped copy-on-write (`MappedFile`) and walked in file order. A tensor that keeps its dtype
    on the CPU is a view of the mapping (no copy; the file is read at page-cache speed); a converted one is read once,
    converted, and its source pages are given back, so peak memory is the converted model plus one tensor in flight
    (a bf16 -> fp8 load peaks near the fp8 size). To a GPU the bytes go through pinned staging buffers
    asynchronously and are converted there. With disable_mmap (--disable_numpy_memmap) each file is read whole in
    one call instead (for file systems where mapping is slow); that holds the raw file in RAM too.
    transform(key, tensor) may replace a converted tensor by other entries (e.g. fp8 weight + scale) as it streams.
    """
    device = torch.device(device)
    out: dict[str, torch.Tensor] = {}
    stager = CudaStager(device) if device.type == "cuda" else None

    def convert(t: torch.Tensor) -> torch.Tensor:
        if stager is not None:
            t = stager.to_device(t)
        if dtype is not None and t.is_floating_point() and t.dtype not in FP8_DTYPES and t.dtype != dtype:
            return t.to(device=device, dtype=dtype)
        return t.to(device=device)

    for f in files:
        if disable_mmap:
            from safetensors.torch import load as load_bytes

            with open(f, "rb") as fh:
                parse_header(fh, f)
                fh.seek(0)
                items = [(k, t, None) for k, t in load_bytes(fh.read()).items()]
            mapped = None
        else:
            needs_copy = device.type != "cpu" or transform is not None
            mapped = MappedFile(f, populate=not needs_copy)
            items = ((k, None, info) for k, info in mapped.entries())
        for k, t, info in items:
            nk = key_map(k)
            if nk is None:
                continue
            src = mapped.view(info) if mapped is not None else t
            t = convert(src)
            result = transform(nk, t) if transform is not None else {nk: t}
            if mapped is not None and all(v.data_ptr() != src.data_ptr() for v in result.values()):
                mapped.release(info)  # converted: its source pages are not needed any more
            out.update(result)
        del mapped
    if stager is not None:
        stager.finish()
    return out
