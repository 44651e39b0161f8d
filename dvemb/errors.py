"""Errors dvemb raises on bad input. Each message names the field, file, step or layer."""


class DvembError(Exception):
    """Base class for every error dvemb raises on purpose."""


class CaptureError(DvembError):
    """A layer cannot be tracked, or a captured gradient is unusable."""


class NonFiniteGradientError(CaptureError):
    """A captured per-sample gradient holds NaN or Inf."""


class StoreError(DvembError):
    """A gradient/embedding store file is missing, truncated, incomplete or inconsistent."""


class ProjectionMismatchError(StoreError):
    """Two projections that must be equal (store vs validation) differ."""


class DataError(DvembError, ValueError):
    """Base class for data-source and table errors."""


class FetchError(DataError):
    """Downloading a source archive with pip failed, or the archive lacks a member."""


class ChecksumError(FetchError):
    """A downloaded archive's sha256 differs from the pinned one."""


class TableValidationError(DataError):
    """A user Parquet table breaks the table contract (sample_id, nulls, column types)."""
