"""pairdots server: Pair the Dots (arXiv 2010.06943) as a gRPC service."""

__version__ = "0.1.0"
