"""User-facing errors. Stage scripts print any `UserError` as one line and exit 2.

Every message names the problem and the fix, e.g.
"cache field 'teacher_sha256' differs (...); rebuild it with: make profile ...".
"""
from __future__ import annotations


class UserError(Exception):
    """Bad input or state that the user can fix; printed as one line, no traceback."""


class ConfigError(UserError):
    """A config key, value or override is wrong."""


class DataError(UserError):
    """A dataset is missing or malformed on disk."""


class CacheError(UserError):
    """A cached artifact (HDF5 features, checkpoint) is missing, corrupt or stale."""


class TrainingError(UserError):
    """Training cannot go on (e.g. a NaN loss); the last good checkpoint is kept."""


class DiskFullError(UserError):
    """A write ran out of disk space; its temp file is removed and the old artifact kept."""


class ExportError(UserError):
    """A student does not export, or its exported file does not give PyTorch's outputs."""
