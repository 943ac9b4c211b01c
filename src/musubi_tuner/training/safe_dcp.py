"""Reading torch.distributed.checkpoint (DCP) folders without executing code from them.

torch's FileSystemReader unpickles `.metadata` with plain `pickle.load`, and its DefaultLoadPlanner reads non-tensor
entries (optimizer hyperparameters) with `torch.load(weights_only=False)`: a crafted state folder passed to --resume
would run arbitrary code. Here the metadata goes through an unpickler that can build only DCP's own metadata classes
and a few plain values, and non-tensor entries are read with `weights_only=True`.
"""

from __future__ import annotations

import dataclasses
import enum
import io
import pickle
from pathlib import Path

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader

from ..errors import UserError

_DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")
_ALLOWED = {
    ("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath"),
}


class MetadataUnpickler(pickle.Unpickler):
    """Only DCP's metadata dataclasses / enums, torch dtypes, torch.Size and paths; anything else is refused."""

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module in _DCP_MODULES:
            obj = super().find_class(module, name)
            if isinstance(obj, type) and (dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum)):
                return obj
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a checkpoint's metadata")


def read_metadata(folder: str | Path):
    path = Path(folder) / ".metadata"
    try:
        with open(path, "rb") as f:
            return MetadataUnpickler(f).load()
    except FileNotFoundError:
        raise UserError(f"--resume: {folder} has no .metadata (an incomplete sharded state)") from None
    except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError, ImportError) as e:
        raise UserError(f"--resume: {path} is not a checkpoint metadata file this tool will read ({e}); it may have "
                        "been tampered with: resume from a state folder you wrote") from None


class SafeReader(FileSystemReader):
    def read_metadata(self, *args, **kwargs):
        if kwargs.get("rank") is not None:
            raise UserError("--resume: per-rank DCP metadata files are not supported")
        from torch.distributed.checkpoint.metadata import StorageMeta

        metadata = read_metadata(self.path)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """Non-tensor entries (optimizer hyperparameters) are read with torch.load(weights_only=True)."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            raise UserError(f"--resume: a value in the sharded state ({read_item.dest_index.fqn}) is not plain data "
                            f"({str(e).splitlines()[0][:200]}); resume from a state folder you wrote") from None
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._traverse import set_element  # as DefaultLoadPlanner does

            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj
