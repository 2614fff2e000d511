"""Data: raw data-set readers, the embedded synthetic set, the image index and the image cache.

* :mod:`~dmdl_cli.data.index` — :class:`IndexTable`, ``index.csv`` read / write, modality codes;
* :mod:`~dmdl_cli.data.sources` — SYSU-MM01, RegDB, LLCM readers and the bad-image scan;
* :mod:`~dmdl_cli.data.synthetic` — the seeded synthetic visible-infrared data set;
* :mod:`~dmdl_cli.data.cache` — decode + resize once into a memory-mapped uint8 array.
"""
from dmdl_cli.data.index import (
    INDEX_HEADER,
    INFRARED,
    VISIBLE,
    IndexTable,
    index_fingerprint,
    read_index,
    write_index,
)

__all__ = [
    "VISIBLE",
    "INFRARED",
    "INDEX_HEADER",
    "IndexTable",
    "read_index",
    "write_index",
    "index_fingerprint",
]
