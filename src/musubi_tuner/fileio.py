"""Atomic file writes: everything is written to a temporary file in the target folder, then renamed, so an
interrupted run never leaves a half-written checkpoint, cache or image behind.

Temporary names are `.<final name>.<random>.tmp` (files and folders alike), so leftovers of a killed process can be
recognised and removed (training.outputs.remove_leftovers). Finished files get the usual permissions (0666 / 0777
under the user's umask), not the 0600 / 0700 of mkstemp / mkdtemp.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import stat
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

TMP_SUFFIX = ".tmp"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def usual_permissions(path: str | os.PathLike, folder: bool = False) -> None:
    os.chmod(path, (0o777 if folder else 0o666) & ~_umask())


def temp_name_prefix(final: Path) -> str:
    return f".{final.name}."


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside `path`; on success it is renamed to `path`, on failure removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=temp_name_prefix(path), suffix=TMP_SUFFIX, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        # after writing: writers such as safetensors' save_file replace the file, so its mode is set here
        usual_permissions(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def open_no_follow(path: str | os.PathLike, flags: int, what: str, mode: int = 0o666) -> int:
    """os.open that never follows a link and never blocks on a FIFO: a symbolic link (anyone who can write in a
    shared folder could point one at a file of ours) or anything but a regular file at `path` is one clear error."""
    from .errors import UserError

    path = Path(path)
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK, mode)
    except OSError as e:
        if e.errno == errno.ELOOP or path.is_symlink():
            raise UserError(f"{what} {path} is a symbolic link, which this tool never writes through; remove it "
                            f"(rm '{path}') and run again") from None
        raise UserError(f"cannot open {what} {path}: {e.strerror or e}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UserError(f"{what} {path} is not a regular file; remove it and run again")
    return fd


def temp_folder(final: str | os.PathLike) -> Path:
    """An empty temporary folder beside `final` (to be renamed onto it once complete)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=temp_name_prefix(final), suffix=TMP_SUFFIX, dir=final.parent))
    usual_permissions(tmp, folder=True)
    return tmp


def remove_path(p: str | os.PathLike) -> None:
    """Remove a file, a link (never what it points to) or a folder tree; nothing there is fine."""
    import shutil

    p = Path(p)
    shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    with atomic_path(path) as tmp:
        try:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        except Exception as e:  # safetensors reports write failures as SafetensorError("... Os { code: 28 ...")
            code = re.search(r"(?:code: |os error )(\d+)", str(e))
            if code is None or isinstance(e, OSError):
                raise
            raise OSError(int(code[1]), os.strerror(int(code[1])), str(path)) from None
    return Path(path)


def save_image(image, path: str | os.PathLike, text: dict[str, str] | None = None, **kwargs) -> Path:
    """Save a PIL image; the format comes from the final name's suffix; `text`: PNG text chunks (UTF-8 iTXt, so any
    language), e.g. the generation parameters."""
    path = Path(path)
    if text and path.suffix.lower() == ".png":
        from PIL.PngImagePlugin import PngInfo

        info = PngInfo()
        for k, v in text.items():
            info.add_itxt(k, str(v))
        kwargs["pnginfo"] = info
    with atomic_path(path) as tmp:
        image.save(tmp, format=path.suffix.lstrip(".").upper().replace("JPG", "JPEG"), **kwargs)
    return path


# safetensors dtype names <-> torch dtypes (reading and streaming writes share this one table)
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
# dtype names of the options (--save_precision, --vae_dtype)
DTYPE_NAMES = {"float": torch.float32, "fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16,
               "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def save_safetensors_streaming(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                               metadata: dict[str, str] | None = None, dtype: torch.dtype | None = None) -> Path:
    """Write a safetensors file tensor by tensor (header first, then each tensor's bytes), converting to `dtype` one
    tensor at a time: peak extra memory is one tensor, not a second copy of the whole state dict."""
    import struct

    def conv(t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        return t

    header, offset = {}, 0
    for k, t in tensors.items():
        dt = dtype if (dtype is not None and t.is_floating_point()) else t.dtype
        n = t.numel() * torch.empty((), dtype=dt).element_size()
        header[k] = {"dtype": _DTYPE_NAMES[dt], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keep the data 8-byte aligned
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for k, t in tensors.items():
            c = conv(t).contiguous().cpu()
            f.write(c.reshape(-1).view(torch.uint8).numpy().tobytes() if c.numel() else b"")  # 0-dim too
            del c
    return Path(path)


def read_text(path: str | os.PathLike, what: str = "file") -> str:
    """A UTF-8 text file; anything else is one clear error naming the file and the byte."""
    from .errors import UserError

    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{what} {path} is not UTF-8 text (byte {e.start}: {e.object[e.start:e.start + 1]!r}); "
                        "save it as UTF-8") from None
    except OSError as e:
        raise UserError(f"cannot read {what} {path}: {e.strerror or e}") from None


def parse_toml(text: str, where: str) -> dict:
    """TOML text -> dict; invalid TOML is one error line starting with `where` (the option and the file)."""
    import tomllib

    from .errors import UserError

    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{where}: invalid TOML ({e})") from None


def check_writable_folder(path: str | os.PathLike, option: str) -> None:
    """Fail now, not after hours of work, when `path` cannot become a folder we can write into. Nothing is created:
    a probe file is made (and removed) in the nearest folder that exists."""
    from .errors import UserError

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{option} {path} is a file, not a folder; pass a folder")
    probe_dir = path
    while not probe_dir.exists():
        if probe_dir.parent == probe_dir:
            break
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        raise UserError(f"{option} {path}: {probe_dir} is a file, so the folder cannot be created")
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-probe.", suffix=TMP_SUFFIX, dir=probe_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"{option} {path}: cannot write in {probe_dir} ({e.strerror or e}); choose a writable "
                        "folder") from None
