"""Reading checkpoint files without running code from them.

Trust model: a checkpoint is data. Python's pickle runs whatever a file names, so a crafted
`iter_*/.metadata` (which torch's dist-checkpoint reader unpickles) or a DeepSpeed `.pt` file
(which DeepSpeed reads with `torch.load(weights_only=False)`) would run code under `--load`.
Here every such file is parsed first by an unpickler that builds only the classes the format
needs and refuses anything else, naming the file and the class.
"""

import pickle
from pathlib import Path

import torch

_DCP = "torch.distributed.checkpoint"
# What a dist-checkpoint `.metadata` holds (torch 2.13): its dataclasses, torch sizes/dtypes and
# the layout/memory-format helpers torch pickles them with.
DIST_METADATA_ALLOWED = frozenset(
    {
        (f"{_DCP}.metadata", name)
        for name in (
            "Metadata",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "ChunkStorageMetadata",
            "TensorProperties",
            "MetadataIndex",
            "StorageMeta",
            "_MEM_FORMAT_ENCODING",
        )
    }
    | {
        (f"{_DCP}.planner", name)
        for name in ("SavePlan", "WriteItem", "WriteItemType", "TensorWriteData", "LoadItemType")
    }
    | {
        (f"{_DCP}.filesystem", "_StorageInfo"),
        (f"{_DCP}.filesystem", "_StoragePrefix"),
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),
        ("collections", "OrderedDict"),
        ("builtins", "set"),
        ("builtins", "frozenset"),
    }
)


class UnsafeCheckpointError(ValueError):
    """A checkpoint file that names something other than plain data; it is never executed."""


class _AllowListUnpickler(pickle.Unpickler):
    def __init__(self, file, path, allowed):
        super().__init__(file)
        self._path = path
        self._allowed = allowed

    def find_class(self, module: str, name: str):
        allowed = (module, name) in self._allowed or (
            module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        )
        if not allowed:
            raise UnsafeCheckpointError(
                f"{self._path} refers to {module}.{name}, which is not checkpoint data; refusing "
                "to load it (the file may have been tampered with). Use a checkpoint from a "
                "source you trust."
            )
        return super().find_class(module, name)

    def persistent_load(self, pid):
        raise UnsafeCheckpointError(f"{self._path}: unexpected persistent id; refusing to load it.")


def read_dist_metadata(directory):
    """Parses `directory/.metadata` with the allow-list; returns torch's `Metadata`.

    Raises:
        UnsafeCheckpointError: when the file names a class outside the allow-list.
        FileNotFoundError: when the file is missing.
        ValueError: when it is truncated or not a pickle.
    """
    path = Path(directory) / ".metadata"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {directory} is not a complete checkpoint.")
    with open(path, "rb") as file:
        try:
            return _AllowListUnpickler(file, path, DIST_METADATA_ALLOWED).load()
        except UnsafeCheckpointError:
            raise
        except Exception as error:  # truncated or garbage: any unpickling failure
            raise ValueError(f"{path} is corrupt ({type(error).__name__}: {error}).") from None


def check_dist_checkpoint(directory) -> None:
    """Checks that a dist checkpoint is complete and safe to hand to megatron's loader.

    The `.metadata` is parsed with the allow-list, and every shard file it names must exist
    and be long enough for every item it holds (a deleted or truncated shard is named).

    Raises:
        ValueError / FileNotFoundError: one line naming the file and what is wrong.
    """
    directory = Path(directory)
    metadata = read_dist_metadata(directory)
    needed: dict = {}
    for info in (metadata.storage_data or {}).values():
        end = info.offset + info.length
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
    for name, end in sorted(needed.items()):
        shard = directory / name
        if not shard.is_file():
            raise FileNotFoundError(
                f"{shard} is missing: {directory} is not a complete checkpoint."
            )
        size = shard.stat().st_size
        if size < end:
            raise ValueError(
                f"{shard} is truncated ({size} bytes, {end} expected): {directory} is not a "
                "complete checkpoint."
            )


def safe_torch_load(path, map_location=None, allowed=()):
    """`torch.load` with `weights_only=True` and only `allowed` extra globals.

    Raises:
        UnsafeCheckpointError: naming the file, when it needs anything else.
    """
    with torch.serialization.safe_globals(list(allowed)):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as error:
            first = str(error).strip().splitlines()[0] if str(error).strip() else "unpickling"
            raise UnsafeCheckpointError(
                f"{path} is not plain checkpoint data ({first[:200]}); refusing to load it. "
                "Use a checkpoint from a source you trust."
            ) from None
