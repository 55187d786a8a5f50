"""grail-pipeline: a fast, network-free GRAIL mining pipeline."""

__version__ = "0.1.0"
