"""Readers for the raw datasets that become shards: ``open_source("KIND[:PATH]")`` for
``fashion-mnist``, ``mnist``, ``cifar10``, ``cifar100``, ``imagefolder`` and ``npz`` (the specs:
docs/DATA.md). Every reader error is a one-line :class:`SourceError` naming the file and field.
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import tarfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from .errors import DataError

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIR",
    "SOURCE_KINDS",
    "Source",
    "SourceError",
    "open_source",
]

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                         "Shirt", "Sneaker", "Bag", "Ankle boot"]
SOURCE_KINDS = ("fashion-mnist", "mnist", "cifar10", "cifar100", "imagefolder", "npz")
IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


class SourceError(DataError):
    """The raw input is unusable; the message names the file and field."""


@dataclass
class Source:
    """Random access to N images (uint8 HxW grey or HxWx3 RGB) and optional labels.

    Array-backed sources hold all pixels in memory (MNIST/CIFAR/npz fit easily); image folders
    keep a file list and decode on access, so large folders never sit in RAM.
    """

    name: str
    class_names: list[str]
    channels: int  # native: 1 (grey) or 3
    images: np.ndarray | None = None
    labels: np.ndarray | None = None
    files: list[str] = field(default_factory=list)
    file_labels: list[int] | None = None

    def __len__(self) -> int:
        return len(self.images) if self.images is not None else len(self.files)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def get(self, i: int, channels: int | None = None) -> tuple[np.ndarray, int | None]:
        """Image i (grey or RGB as requested, else native) and its label."""
        if self.images is not None:
            img = self.images[i]
            label = None if self.labels is None else int(self.labels[i])
        else:
            path = self.files[i]
            try:
                with Image.open(path) as im:
                    img = image_array(im, channels or self.channels)
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
                raise SourceError(f"{path}: cannot decode image ({exc})") from None
            label = None if self.file_labels is None else self.file_labels[i]
        return img, label


def image_array(im: Image.Image, channels: int) -> np.ndarray:
    """A decoded image as uint8 grey (H, W) or RGB (H, W, 3); transparency (RGBA, LA,
    palette) is composited on black, as in every source and in indexed shards."""
    if im.mode in ("RGBA", "LA", "P") and channels == 3:
        im = Image.alpha_composite(Image.new("RGBA", im.size, (0, 0, 0, 255)),
                                   im.convert("RGBA"))
    return np.asarray(im.convert("L" if channels == 1 else "RGB"))


def _read_maybe_gzip(path: str) -> bytes:
    with open(path, "rb") as f:
        data = f.read()
    if data[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(data)
        except (OSError, EOFError) as exc:
            raise SourceError(f"{path}: corrupt gzip ({exc})") from None
    return data


def _read_idx(path: str, ndim: int) -> np.ndarray:
    """MNIST idx format: magic (0, 0, dtype 0x08=ubyte, ndim), big-endian dims, raw data."""
    data = _read_maybe_gzip(path)
    if len(data) < 4 + 4 * ndim or data[0] != 0 or data[1] != 0:
        raise SourceError(f"{path}: not an idx file (bad magic number)")
    if data[2] != 0x08:
        raise SourceError(f"{path}: idx dtype 0x{data[2]:02x} unsupported (need 0x08 ubyte)")
    if data[3] != ndim:
        raise SourceError(f"{path}: idx has {data[3]} dimensions, expected {ndim}")
    dims = [int.from_bytes(data[4 + 4 * k: 8 + 4 * k], "big") for k in range(ndim)]
    body = data[4 + 4 * ndim:]
    if len(body) != int(np.prod(dims)):
        raise SourceError(f"{path}: idx body has {len(body)} bytes, header promises "
                          f"{int(np.prod(dims))} for shape {tuple(dims)}")
    return np.frombuffer(body, dtype=np.uint8).reshape(dims)


def _find(dirpath: str, *stems: str) -> str | None:
    """The first of `stems` (or its .gz) that is a file in `dirpath`."""
    for stem in stems:
        for name in (stem, stem + ".gz"):
            p = os.path.join(dirpath, name)
            if os.path.isfile(p):
                return p
    return None


def _mnist(path: str, split: str, class_names: list[str], name: str) -> Source:
    prefix = "t10k" if split == "test" else "train"
    if os.path.isdir(path):
        # the original files are named train-images-idx3-ubyte; many extracted copies have
        # train-images.idx3-ubyte
        images = _find(path, f"{prefix}-images-idx3-ubyte", f"{prefix}-images.idx3-ubyte")
        labels = _find(path, f"{prefix}-labels-idx1-ubyte", f"{prefix}-labels.idx1-ubyte")
        if images is None:
            raise SourceError(f"{path}: no {prefix}-images-idx3-ubyte[.gz] (or "
                              f"{prefix}-images.idx3-ubyte) in this directory")
    elif os.path.isfile(path):
        images = path
        guess = path.replace("images-idx3", "labels-idx1").replace("images.idx3", "labels.idx1")
        labels = guess if guess != path and os.path.isfile(guess) else None
    else:
        raise SourceError(f"{path}: no such file or directory")
    x = _read_idx(images, 3)
    y = None
    if labels is not None:
        y = _read_idx(labels, 1)
        if len(y) != len(x):
            raise SourceError(f"{labels}: {len(y)} labels for {len(x)} images in {images}")
        if y.size and int(y.max()) >= len(class_names):
            raise SourceError(f"{labels}: label {int(y.max())} >= {len(class_names)} classes")
    return Source(name=f"{name}:{images}", class_names=class_names if y is not None else [],
                  channels=1, images=x, labels=y)


class _SafeUnpickler(pickle.Unpickler):
    """CIFAR batches are pickles; allow only the numpy pieces they need, never arbitrary code."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray",
                                                            "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
               ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")


def _unpickle(data: bytes, where: str) -> dict:
    try:
        obj = _SafeUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as exc:  # any unpickling failure is a bad input file
        raise SourceError(f"{where}: not a CIFAR python pickle ({exc})") from None
    if not isinstance(obj, dict):
        raise SourceError(f"{where}: expected a dict, got {type(obj).__name__}")
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in obj.items()}


def _cifar_members(path: str) -> dict[str, tuple[str, bytes]]:
    """{basename: (where, bytes)} from a tarball or a directory."""
    out: dict[str, tuple[str, bytes]] = {}
    if os.path.isdir(path):
        for name in os.listdir(path):
            p = os.path.join(path, name)
            if os.path.isfile(p):
                with open(p, "rb") as f:
                    out[name] = (p, f.read())
        return out
    if not os.path.isfile(path):
        raise SourceError(f"{path}: no such file or directory")
    try:
        with tarfile.open(path, "r:*") as tf:
            for m in tf:
                if m.isreg():
                    f = tf.extractfile(m)
                    if f is not None:
                        out[os.path.basename(m.name)] = (f"{path}:{m.name}", f.read())
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise SourceError(f"{path}: not a readable tarball ({exc})") from None
    return out


def _cifar(path: str, split: str, fine: bool) -> Source:
    members = _cifar_members(path)
    if fine:
        batch_names, label_key, meta_name, names_key = [split], "fine_labels", "meta", \
            "fine_label_names"
    else:
        batch_names = ["test_batch"] if split == "test" else [f"data_batch_{i}"
                                                              for i in range(1, 6)]
        label_key, meta_name, names_key = "labels", "batches.meta", "label_names"
    xs, ys = [], []
    for b in batch_names:
        if b not in members:
            raise SourceError(f"{path}: missing CIFAR batch '{b}'")
        where, raw = members[b]
        d = _unpickle(raw, where)
        for needed in ("data", label_key):
            if needed not in d:
                raise SourceError(f"{where}: missing field '{needed}'")
        data = np.asarray(d["data"])
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            raise SourceError(f"{where}: field 'data' must be uint8 (N, 3072), got "
                              f"{data.dtype} {data.shape}")
        labels = np.asarray(d[label_key], dtype=np.int64)
        if len(labels) != len(data):
            raise SourceError(f"{where}: field '{label_key}' has {len(labels)} entries for "
                              f"{len(data)} images")
        xs.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        ys.append(labels)
    n_classes = 100 if fine else 10
    names = [str(i) for i in range(n_classes)]
    if meta_name in members:
        meta = _unpickle(members[meta_name][1], members[meta_name][0])
        if names_key in meta and len(meta[names_key]) == n_classes:
            names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta[names_key]]
    y = np.concatenate(ys)
    if y.size and (y.min() < 0 or y.max() >= n_classes):
        raise SourceError(f"{path}: label {int(y.max())} outside [0, {n_classes})")
    return Source(name=f"{'cifar100' if fine else 'cifar10'}:{path}", class_names=names,
                  channels=3, images=np.ascontiguousarray(np.concatenate(xs)), labels=y)


def _npz(path: str) -> Source:
    if not os.path.isfile(path):
        raise SourceError(f"{path}: no such file")
    try:
        z = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise SourceError(f"{path}: not a readable .npz ({exc})") from None
    with z:
        if "x" not in z.files:
            raise SourceError(f"{path}: missing array 'x' (has: {', '.join(z.files) or 'none'})")
        x = z["x"]
        y = z["y"] if "y" in z.files else None
        names = [str(n) for n in z["class_names"]] if "class_names" in z.files else None
    if x.ndim == 4 and x.shape[1] in (1, 3) and x.shape[-1] not in (1, 3):
        x = x.transpose(0, 2, 3, 1)  # NCHW -> NHWC
    if x.ndim == 4 and x.shape[-1] == 1:
        x = x[..., 0]
    if not (x.ndim == 3 or (x.ndim == 4 and x.shape[-1] == 3)):
        raise SourceError(f"{path}: field 'x' must be (N,H,W), (N,H,W,1|3) or (N,1|3,H,W), "
                          f"got {x.shape}")
    if x.dtype != np.uint8:
        if not np.issubdtype(x.dtype, np.floating):
            raise SourceError(f"{path}: field 'x' must be uint8 or float in [0, 1], got "
                              f"{x.dtype}")
        if x.size and (float(np.nanmin(x)) < 0.0 or float(np.nanmax(x)) > 1.0):
            raise SourceError(f"{path}: field 'x' is float but not in [0, 1] "
                              f"(min {float(np.nanmin(x)):.3g}, max {float(np.nanmax(x)):.3g})")
        x = np.round(np.nan_to_num(x) * 255.0).astype(np.uint8)
    classes: list[str] = []
    if y is not None:
        if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
            raise SourceError(f"{path}: field 'y' must be integers of shape ({len(x)},), got "
                              f"{y.dtype} {y.shape}")
        if y.size and y.min() < 0:
            raise SourceError(f"{path}: field 'y' has negative label {int(y.min())}")
        n = int(y.max()) + 1 if y.size else 0
        if names is not None:
            if len(names) < n:
                raise SourceError(f"{path}: field 'class_names' has {len(names)} names but "
                                  f"'y' uses {n} classes")
            classes = names
        else:
            classes = [str(i) for i in range(n)]
    return Source(name=f"npz:{path}", class_names=classes,
                  channels=1 if x.ndim == 3 else 3, images=np.ascontiguousarray(x),
                  labels=None if y is None else y.astype(np.int64))


def _imagefolder(root: str, unconditional: bool) -> Source:
    if not os.path.isdir(root):
        raise SourceError(f"{root}: no such directory")

    def images_in(d: str, recursive: bool) -> list[str]:
        out = []
        for dirpath, dirnames, filenames in os.walk(d):
            dirnames[:] = sorted(n for n in dirnames if not n.startswith("."))
            out += [os.path.join(dirpath, f) for f in sorted(filenames)
                    if os.path.splitext(f)[1].lower() in IMAGE_EXTS]
            if not recursive:
                break
        return out

    top = images_in(root, recursive=False)
    subdirs = sorted(n for n in os.listdir(root)
                     if os.path.isdir(os.path.join(root, n)) and not n.startswith("."))
    if unconditional or not subdirs:
        files = images_in(root, recursive=True)
        if not files:
            raise SourceError(f"{root}: no images ({', '.join(sorted(IMAGE_EXTS))})")
        return Source(name=f"imagefolder:{root}", class_names=[], channels=3, files=files)
    if top:
        raise SourceError(f"{root}: has both images at top level ({os.path.basename(top[0])}, "
                          "...) and class sub-folders; use --unconditional or move them")
    files, labels, classes = [], [], []
    for name in subdirs:
        found = images_in(os.path.join(root, name), recursive=True)
        if not found:
            continue  # empty folders are not classes
        labels += [len(classes)] * len(found)
        files += found
        classes.append(name)
    if not files:
        raise SourceError(f"{root}: class sub-folders contain no images")
    return Source(name=f"imagefolder:{root}", class_names=classes, channels=3, files=files,
                  file_labels=labels)


def open_source(spec: str, split: str = "train", unconditional: bool = False) -> Source:
    """Parse ``KIND[:PATH]`` (see module docstring) and open it."""
    kind, _, path = spec.partition(":")
    kind = kind.strip().lower()
    path = os.path.expanduser(path.strip())
    if split not in ("train", "test"):
        raise SourceError(f"split must be 'train' or 'test', got {split!r}")
    if kind not in SOURCE_KINDS:
        raise SourceError(f"unknown source kind '{kind}' in '{spec}' "
                          f"(expected one of: {', '.join(SOURCE_KINDS)}, as KIND:PATH)")
    if kind == "fashion-mnist":
        src = _mnist(path or FASHION_MNIST_DIR, split, FASHION_MNIST_CLASSES, "fashion-mnist")
    elif not path:
        raise SourceError(f"source '{spec}' needs a path: {kind}:PATH")
    elif kind == "mnist":
        src = _mnist(path, split, [str(i) for i in range(10)], "mnist")
    elif kind in ("cifar10", "cifar100"):
        src = _cifar(path, split, fine=kind == "cifar100")
    elif kind == "npz":
        src = _npz(path)
    else:
        src = _imagefolder(path, unconditional)
    if unconditional:
        src.class_names, src.labels, src.file_labels = [], None, None
    return src
