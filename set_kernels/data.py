"""Data for ``set-kernels train``: Fashion-MNIST from IDX (gzip) files, or a synthetic stand-in.

Fashion-MNIST is read from a directory holding ``train-images-idx3-ubyte.gz``,
``train-labels-idx1-ubyte.gz``, ``t10k-images-idx3-ubyte.gz`` and ``t10k-labels-idx1-ubyte.gz``
(plain, non-gzipped files are accepted too). :func:`find_fashion_mnist` looks at ``--data-dir``,
then at the files of the Debian package ``dataset-fashion-mnist`` (``dpkg -L``), then at its
standard location ``/usr/share/datasets/fashion-mnist``.
"""
from __future__ import annotations

import gzip
import os
import shutil
import struct
import subprocess

import numpy as np
import torch

FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
DEBIAN_PACKAGE = "dataset-fashion-mnist"
STANDARD_DIR = "/usr/share/datasets/fashion-mnist"
N_FEATURES = 784
N_CLASSES = 10
N_TRAIN, N_TEST = 60000, 10000
STD_FLOOR = 0.05


def _file_in(directory: str, stem: str) -> str | None:
    for name in (stem + ".gz", stem):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return path
    return None


def _has_all(directory: str) -> bool:
    return all(_file_in(directory, stem) is not None for stem in FILES.values())


def _dpkg_dirs() -> list[str]:
    if shutil.which("dpkg") is None:
        return []
    try:
        out = subprocess.run(["dpkg", "-L", DEBIAN_PACKAGE], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return []
    if out.returncode != 0:
        return []
    stem = FILES["train_images"]
    return sorted({os.path.dirname(line.strip()) for line in out.stdout.splitlines()
                   if os.path.basename(line.strip()) in (stem, stem + ".gz")})


def find_fashion_mnist(data_dir: str | None = None) -> str | None:
    """The directory holding the four Fashion-MNIST IDX files, or None when none is found.

    With ``data_dir`` only that directory is considered.
    """
    if data_dir is not None:
        return data_dir if _has_all(data_dir) else None
    for directory in _dpkg_dirs() + [STANDARD_DIR]:
        if _has_all(directory):
            return directory
    return None


def read_idx(path: str) -> np.ndarray:
    """An IDX file (optionally gzip-compressed) as a numpy array of its declared shape (uint8 data)."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4:
        raise ValueError(f"{path}: not an IDX file (too short)")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path}: expected an IDX file of unsigned bytes (magic 0x0008), got {raw[:4].hex()}")
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {dims} but holds {data.size} bytes")
    return data.reshape(dims)


def load_fashion_mnist(directory: str):
    """``(x_train uint8 (60000, 784), y_train int64, x_test uint8 (10000, 784), y_test int64)`` as numpy."""
    arrays = {key: read_idx(_file_in(directory, stem)) for key, stem in FILES.items()}
    x_train = arrays["train_images"].reshape(len(arrays["train_images"]), -1)
    x_test = arrays["test_images"].reshape(len(arrays["test_images"]), -1)
    return x_train, arrays["train_labels"].astype(np.int64), x_test, arrays["test_labels"].astype(np.int64)


def synthetic(n_train: int, n_test: int, seed: int = 0):
    """A learnable stand-in shaped like Fashion-MNIST: uint8 ``(n, 784)`` images, int64 labels in [0, 10).

    Each class is a smooth random prototype; a sample is its prototype plus noise and a random
    brightness, clipped to [0, 255].
    """
    rng = np.random.default_rng(seed)
    protos = rng.random((N_CLASSES, 28, 28))
    for _ in range(3):  # blur: neighbouring pixels correlate, like images
        protos = (protos + np.roll(protos, 1, 1) + np.roll(protos, 1, 2)) / 3
    protos = (protos - protos.min()) / (protos.max() - protos.min())
    protos = protos.reshape(N_CLASSES, -1)

    def draw(n):
        y = rng.integers(0, N_CLASSES, n)
        x = protos[y] * rng.uniform(0.6, 1.0, (n, 1)) + rng.normal(0, 0.25, (n, N_FEATURES))
        return np.clip(x * 255, 0, 255).astype(np.uint8), y.astype(np.int64)

    x_train, y_train = draw(n_train)
    x_test, y_test = draw(n_test)
    return x_train, y_train, x_test, y_test


def prepare(x_train, y_train, x_test, y_test, n_train: int | None, n_test: int | None, *, subset_seed: int = 0):
    """Random subsets and the tutorial's input scaling; float32 / int64 torch tensors.

    The subsets are drawn with a fixed ``subset_seed`` (so every run of an experiment sees the same
    samples). Pixels are scaled to [0, 1], then standardised per pixel with the training subset's
    mean and standard deviation, the test set with the training statistics, as the SET tutorial
    does (``(x - mean) / (std + 1e-4)``), except that ``std`` is floored at ``STD_FLOOR`` = 0.05:
    with 2,000 samples some border pixels have a standard deviation near 0.0005, and one bright
    test pixel there would become an input in the thousands.
    """
    rng = np.random.default_rng(subset_seed)
    tr = rng.permutation(len(x_train))[: n_train or len(x_train)]
    te = rng.permutation(len(x_test))[: n_test or len(x_test)]
    xtr = x_train[tr].astype(np.float64) / 255.0
    xte = x_test[te].astype(np.float64) / 255.0
    mean = xtr.mean(axis=0)
    std = np.maximum(xtr.std(axis=0), STD_FLOOR)
    xtr = (xtr - mean) / (std + 1e-4)
    xte = (xte - mean) / (std + 1e-4)
    return (torch.from_numpy(xtr.astype(np.float32)), torch.from_numpy(y_train[tr]),
            torch.from_numpy(xte.astype(np.float32)), torch.from_numpy(y_test[te]))
