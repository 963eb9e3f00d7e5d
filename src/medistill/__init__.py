"""medistill: dataset distillation for medical imaging."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("medistill")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0+unknown"
