"""Pieces more than one shardgen process uses: logging and tracing set-up, the sampling
parameters of a request, and the version."""

__version__ = "0.1.0"
