"""SAM 3 data engine: images in; verified, concept-rich segmentation tables out."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("sam3-data-engine")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
