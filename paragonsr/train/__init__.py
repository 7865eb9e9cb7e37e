"""Headless ParagonSR training: one loop, read top to bottom in :mod:`paragonsr.train.loop`."""

from .loop import TrainConfig, TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "train"]
