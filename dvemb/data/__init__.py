"""Offline data sources → Parquet tables with ``sample_id``; GPT-2 tokenizer; DataModule."""

from dvemb.data.datamodule import PlannedBatchSampler, TableDataModule, TableDataset
from dvemb.data.tables import (
    SOURCES,
    SPLITS,
    corrupted_table,
    flip_labels,
    load_source,
    load_user_table,
    validate_table,
    write_splits,
)
from dvemb.data.tokenizer import GPT2Tokenizer
from dvemb.errors import ChecksumError, DataError, FetchError, TableValidationError
from dvemb.store.atomic import write_parquet_atomic

__all__ = [
    "SOURCES",
    "SPLITS",
    "ChecksumError",
    "DataError",
    "FetchError",
    "GPT2Tokenizer",
    "PlannedBatchSampler",
    "TableDataModule",
    "TableDataset",
    "TableValidationError",
    "corrupted_table",
    "flip_labels",
    "load_source",
    "load_user_table",
    "validate_table",
    "write_parquet_atomic",
    "write_splits",
]
