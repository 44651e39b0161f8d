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
