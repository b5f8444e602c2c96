"""WebDataset shards in a local directory, ``s3://`` or ``http(s)://`` prefix: streamed into
training, read once for evaluation, written from raw datasets.

A dataset is ``<prefix>/train-%06d.tar`` shards (each sample a ``__key__``, a ``png`` and, when
conditional, a ``cls``) plus ``<prefix>/manifest.json``. Failures are counted, never silent,
never a hang: unreadable shards and corrupt samples are skipped and counted in
:class:`DataStats`; what no retry fixes raises :class:`DataError` with one line. The modules, and
why they work as they do: docs/DATA.md ("Design notes").
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
