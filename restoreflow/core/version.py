"""The installed distribution's version (``0.0.0`` when running from a bare checkout)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("restoreflow")
except PackageNotFoundError:  # pragma: no cover - running from a bare checkout
    __version__ = "0.0.0"
