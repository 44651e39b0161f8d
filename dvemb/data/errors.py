"""Errors raised by dvemb.data. Each message names the package, file, column or id at fault."""

from __future__ import annotations

from dvemb.errors import DvembError


class DataError(DvembError, ValueError):
    """Base class for data-source and table errors."""


class FetchError(DataError):
    """Downloading a source archive with pip failed, or the archive lacks a member."""


class ChecksumError(FetchError):
    """A downloaded archive's sha256 differs from the pinned one."""


class TableValidationError(DataError):
    """A user Parquet table breaks the table contract (sample_id, nulls, column types)."""
