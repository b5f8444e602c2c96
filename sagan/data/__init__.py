"""WebDataset shards in local directories or object storage, streamed into training.

Layout of a dataset (ARCHITECTURE.md §5): ``<prefix>/train-%06d.tar`` shards written by
``webdataset.ShardWriter``, each sample a ``__key__`` with a ``png`` member and, for conditional
sets, a ``cls`` member (decimal text); plus ``<prefix>/manifest.json`` with the source, image size,
channels, class names, per-shard sample count and sha256, and the total. ``<prefix>`` is a local
directory, ``s3://bucket/prefix`` (any S3-compatible store) or an ``http(s)://`` URL prefix.

Modules, in the order data flows through them:

* :mod:`.errors`    DataError, DataStats, RetryPolicy; which failures are transient or fatal.
* :mod:`.storage`   local / ``s3://`` / ``http(s)://`` byte streams that resume after a broken
  connection (Range + If-Match), with retries and a bounded outage; ``gopen_s3`` registered in
  ``webdataset.gopen_schemes``.
* :mod:`.manifest`  Manifest, ShardInfo, load_manifest.
* :mod:`.pipeline`  the webdataset pipeline stages: open shards, parse them with webdataset,
  check each against the manifest's sample count, decode and validate, batch.
* :mod:`.loaders`   train_loader (rank/worker split, resampled, shuffled, ``with_epoch``) and
  eval_loader (one exact pass in manifest order).
* :mod:`.writer`    write_shards.
* :mod:`.sources`   readers for the raw datasets (MNIST idx, CIFAR, npz, image folders):
  ``open_source("KIND:PATH")``.
* :mod:`.prepare`   raw dataset -> shards: transform_image, prepare_dataset, ensure_dataset.

Failures are counted, never silent, never a hang: a shard that stays unreadable, is not a tar,
ends early or fails its sha256 is skipped with a warning; corrupt samples are skipped; both are
counted in :class:`DataStats`. Credential/bucket errors, an endpoint unreachable for
``RetryPolicy.max_outage_s``, or a stream in which no shard yields a single valid sample raise
:class:`DataError` with one clear line.

This package never imports ray or mlflow (ARCHITECTURE.md §1).
"""

from .errors import (
    DEFAULT_RETRY,
    DataError,
    DataStats,
    RetryPolicy,
    ShardReadError,
    StorageUnreachable,
)
from .loaders import EvalLoader, TrainLoader, eval_loader, train_loader
from .manifest import (
    FORMAT,
    MANIFEST_NAME,
    SHARD_PATTERN,
    SHARD_RE,
    Manifest,
    ShardInfo,
    load_manifest,
)
from .prepare import FITS, ensure_dataset, prepare_dataset, transform_image
from .sources import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    SOURCE_KINDS,
    Source,
    SourceError,
    open_source,
)
from .storage import gopen_s3, open_url, read_bytes, resolve_endpoint, s3_client
from .writer import write_shards

__all__ = [
    "DEFAULT_RETRY",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIR",
    "FITS",
    "SOURCE_KINDS",
    "FORMAT",
    "MANIFEST_NAME",
    "SHARD_PATTERN",
    "SHARD_RE",
    "DataError",
    "DataStats",
    "EvalLoader",
    "Manifest",
    "RetryPolicy",
    "ShardInfo",
    "ShardReadError",
    "Source",
    "SourceError",
    "StorageUnreachable",
    "TrainLoader",
    "ensure_dataset",
    "eval_loader",
    "gopen_s3",
    "load_manifest",
    "open_source",
    "open_url",
    "prepare_dataset",
    "read_bytes",
    "resolve_endpoint",
    "s3_client",
    "train_loader",
    "transform_image",
    "write_shards",
]
