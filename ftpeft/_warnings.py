"""The warning class of the library."""

from __future__ import annotations

__all__ = ["FtpeftWarning"]


class FtpeftWarning(UserWarning):
    """A warning from ftpeft about input it accepted but could not use in full."""
