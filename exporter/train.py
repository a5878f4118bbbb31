"""``from gptedge.exporter.train import train, TrainConfig``, the import path the README documents;
the trainer lives in :mod:`gptedge.exporter.training.train`."""

from gptedge.exporter.training.train import (
    CKPT_NAME,
    LOG_NAME,
    META_NAME,
    TrainConfig,
    TrainEvent,
    TrainResult,
    matches,
    train,
    train_on,
)

__all__ = ["CKPT_NAME", "LOG_NAME", "META_NAME", "TrainConfig", "TrainEvent", "TrainResult", "matches", "train",
           "train_on"]
