"""Read PyTorch's legacy (pre-1.6, non-zip) ``.pth`` checkpoints into NumPy arrays, without torch.

The legacy format is a sequence of pickles: magic number, protocol version, system info, the
object itself (tensors refer to storages through ``persistent_load``), the list of storage keys,
then each storage's raw bytes (an int64 element count followed by the data), in key order.
"""

from __future__ import annotations

import collections
import pickle
from typing import Any, BinaryIO

import numpy as np

_MAGIC = 0x1950A86A20F9469CFC6C
_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class _StorageType:
    def __init__(self, name: str) -> None:
        self.dtype = np.dtype(_STORAGE_DTYPES[name])


class _Storage:
    def __init__(self, dtype: np.dtype) -> None:
        self.dtype = dtype
        self.data: np.ndarray | None = None


class _LazyTensor:
    """A tensor whose storage bytes come later in the file."""

    def __init__(self, storage: _Storage, offset: int, size: tuple, stride: tuple) -> None:
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)

    def to_numpy(self) -> np.ndarray:
        assert self.storage.data is not None
        itemsize = self.storage.dtype.itemsize
        return np.lib.stride_tricks.as_strided(
            self.storage.data[self.offset :],
            shape=self.size,
            strides=tuple(s * itemsize for s in self.stride),
        ).copy()


def _rebuild_tensor(storage, storage_offset, size, stride, *_unused):
    return _LazyTensor(storage, storage_offset, size, stride)


class _Unpickler(pickle.Unpickler):
    def __init__(self, file: BinaryIO, storages: dict[str, _Storage]) -> None:
        super().__init__(file)
        self._storages = storages

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch._utils" and name in ("_rebuild_tensor", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        raise pickle.UnpicklingError(f"unsupported object in checkpoint: {module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        kind, storage_type, key, _location, _numel, view = pid[0], pid[1], pid[2], pid[3], pid[4], pid[5]
        if kind != "storage" or view is not None:
            raise pickle.UnpicklingError(f"unsupported storage reference: {pid!r}")
        if key not in self._storages:
            self._storages[key] = _Storage(storage_type.dtype)
        return self._storages[key]


def load_legacy_state_dict(path: str) -> dict[str, np.ndarray]:
    """Return ``{name: array}`` for a legacy-format PyTorch ``state_dict`` file."""
    with open(path, "rb") as f:
        if pickle.load(f) != _MAGIC:
            raise ValueError(f"{path} is not a legacy PyTorch checkpoint (bad magic number)")
        pickle.load(f)  # protocol version
        pickle.load(f)  # sys info
        storages: dict[str, _Storage] = {}
        obj = _Unpickler(f, storages).load()
        keys = pickle.load(f)
        for key in keys:
            storage = storages[key]
            count = int(np.frombuffer(f.read(8), dtype="<i8")[0])
            nbytes = count * storage.dtype.itemsize
            storage.data = np.frombuffer(f.read(nbytes), dtype=storage.dtype, count=count)
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, expected a state_dict")
    return {k: v.to_numpy() for k, v in obj.items() if isinstance(v, _LazyTensor)}
