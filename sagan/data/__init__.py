"""WebDataset shards in a local directory, ``s3://`` or ``http(s)://`` prefix: streamed into
training, read once for evaluation, written from raw datasets.

A dataset is ``<prefix>/train-%06d.tar`` shards (each sample a ``__key__``, a ``png`` and, when
conditional, a ``cls``) plus ``<prefix>/manifest.json``, or shards as others write them (brace
lists, prefixes of ``.tar``; any image member, labels from ``cls`` or ``json``) read through an
index (``index.py``, ``shardlist.py``) without re-encoding. Failures are counted, never silent,
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
from .index import IMAGE_KEYS, build_index, scan_shard
from .loaders import EvalLoader, TrainLoader, eval_loader, index_options, train_loader
from .manifest import (
    FORMAT,
    INDEX_FORMAT,
    MANIFEST_NAME,
    SHARD_PATTERN,
    SHARD_RE,
    Manifest,
    NotIndexed,
    ShardInfo,
    load_manifest,
)
from .prepare import FITS, encode_range, ensure_dataset, prepare_dataset, transform_image
from .shardlist import ShardSet, expand, index_location, is_shard_spec
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
    "IMAGE_KEYS",
    "INDEX_FORMAT",
    "NotIndexed",
    "ShardSet",
    "build_index",
    "encode_range",
    "expand",
    "index_location",
    "index_options",
    "is_shard_spec",
    "scan_shard",
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
