"""The installed distribution's version (with its build target, e.g. 0.1.0+cpu)."""
from importlib import metadata

try:
    __version__ = metadata.version("bigkernels")
except metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.1.0+unknown"
