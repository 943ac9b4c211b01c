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
        entries = sorted(((k, v) for k, v in header.items() if k != "__metadata__"),
                         key=lambda kv: kv[1]["data_offsets"][0])
        for key, info in entries:
            dtype = SAFETENSORS_DTYPES.get(info["dtype"])
            if dtype is None:
                raise UserError(f"{path}: tensor {key} has unsupported dtype {info['dtype']}")
            t = torch.empty(info["shape"], dtype=dtype)
            start, end = info["data_offsets"]
            if end > start:
                f.seek(base + start)
                buf = memoryview(t.reshape(-1).view(torch.uint8).numpy())
                if f.readinto(buf) != end - start:
                    raise UserError(f"{path}: file is truncated (tensor {key}); download it again")
            yield key, t


def load_tensors(
    files: list[Path],
    dtype: torch.dtype | None,
    device: str | torch.device = "cpu",
    key_map: Callable[[str], str | None] = lambda k: k,
    disable_mmap: bool = False,
    transform: Callable[[str, torch.Tensor], dict[str, torch.Tensor]] | None = None,
) -> dict[str, torch.Tensor]:
    """Read every tensor, rename it with key_map (None drops it) and convert it straight to dtype/device.

    Tensors are read one at a time with plain file reads and converted immediately, so peak memory is one converted
    copy plus one tensor in flight (a 40 GB file needs ~40 GB, not 80). With disable_mmap (--disable_numpy_memmap)
    each file is read whole in one call instead: faster on some file systems, but it holds the raw file in RAM too.
    transform(key, tensor) may replace a converted tensor by other entries (e.g. fp8 weight + scale) as it streams.
    """
    out: dict[str, torch.Tensor] = {}
    for f in files:
        if disable_mmap:
            from safetensors.torch import load as load_bytes

            with open(f, "rb") as fh:
                parse_header(fh, f)
                fh.seek(0)
                items = load_bytes(fh.read()).items()
        else:
            items = iter_file_tensors(f)
        for k, t in items:
            nk = key_map(k)
            if nk is None:
                continue
            if dtype is not None and t.is_floating_point() and t.dtype not in FP8_DTYPES:
                t = t.to(device=device, dtype=dtype)
            else:
                t = t.to(device=device)
            if transform is not None:
                out.update(transform(nk, t))
            else:
                out[nk] = t
    return out
