"""Errors that name the file and the problem, so a bad radiograph never hides among thousands."""

from __future__ import annotations

from pathlib import Path


class StrnetError(Exception):
    """Base class: every error the command line turns into a one-line message."""


class DataError(StrnetError, ValueError):
    """A data file (image, sheet, CSV, manifest) that cannot be used, with the reason."""

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class ConfigError(StrnetError, ValueError):
    """A configuration file or override that does not fit the schema."""


class SiteError(StrnetError):
    """A federation site's reply that cannot be used, with the site's name and the reason."""

    def __init__(self, site: str, problem: str) -> None:
        self.site = site
        self.problem = problem
        super().__init__(f"site {site!r}: {problem}")
