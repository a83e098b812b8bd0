"""Pieces every shardgen process uses: logging set-up and the version."""

__version__ = "0.1.0"
