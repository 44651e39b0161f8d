"""Errors dvemb raises on bad input. Each message names the field, file, row, step or layer.

The CLI prints a :class:`DvembError` as one line and exits with code 2 (docs/RELIABILITY.md).
"""


class DvembError(Exception):
    """Base class for every error dvemb raises on purpose."""


class CaptureError(DvembError):
    """A layer cannot be tracked, or a captured gradient is unusable."""


class NonFiniteError(DvembError):
    """A NaN or Inf reached a value dvemb would write (scores, values, embeddings, propagators)."""


class TrainingDivergedError(NonFiniteError):
    """The training loss became non-finite or exploded; the message names the first such step."""


class NonFiniteGradientError(CaptureError, NonFiniteError):
    """A captured per-sample gradient holds NaN or Inf."""


class StoreError(DvembError):
    """A gradient/embedding store file is missing, truncated, incomplete or inconsistent."""


class DamagedFileError(StoreError):
    """A run-directory file is unreadable, truncated, or differs from its manifest checksum."""


class ProjectionMismatchError(StoreError):
    """Two projections that must be equal (store vs validation) differ."""


class RunPathError(DvembError):
    """A run directory path is unsafe: it leaves the runs folder, or --force would delete a non-run folder."""


class DataError(DvembError, ValueError):
    """Base class for data-source and table errors."""


class FetchError(DataError):
    """Downloading a source archive with pip failed, or the archive lacks a member."""


class ChecksumError(FetchError):
    """A downloaded archive's sha256 differs from the pinned one."""


class TableValidationError(DataError):
    """A user Parquet table breaks the table contract (sample_id, nulls, column types)."""


class TableMismatchError(DataError):
    """The run's tables disagree: empty split, another feature width or block size, labels out of range."""


class ReplayError(DvembError):
    """A run cannot be replayed exactly, or a replay does not reproduce what was recorded."""
