"""Training: config sections, a plain PyTorch loop, checkpoints. Entry point: :func:`run_training`."""
from .config import DEFAULT, DataSection, ModelSection, OptimSection, OutputSection, RunConfig, TrainSection, resolve
from .loop import (Callback, NonFiniteLossError, TrainingError, TrainingInterrupted, lr_lambda, run_training,
                   seed_everything)

__all__ = ["run_training", "resolve", "RunConfig", "ModelSection", "OptimSection", "DataSection", "TrainSection",
           "OutputSection", "DEFAULT", "Callback", "TrainingError", "NonFiniteLossError", "TrainingInterrupted",
           "lr_lambda", "seed_everything"]
