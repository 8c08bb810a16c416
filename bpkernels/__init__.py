"""bpkernels: a backprop engine for multilayer perceptrons on swappable array backends."""
from __future__ import annotations

from . import lr_scheduler
from .backends import BackendUnavailable, available_backends, get_backend
from .callbacks import EarlyStopping
from .checkpoint import CheckpointError
from .memory import InsufficientMemory
from .model import MLP, load
from .optim import SGD, Adam, AdamW, Optimizer, RMSprop
from .threads import get_num_threads, set_num_threads
from .train import EpochLoop, History, TrainingDiverged, fit

__version__ = "0.1.0"

__all__ = [
    "MLP", "fit", "load", "EpochLoop", "History", "SGD", "Adam", "AdamW", "RMSprop", "Optimizer",
    "available_backends", "get_backend", "BackendUnavailable", "CheckpointError",
    "InsufficientMemory",
    "TrainingDiverged", "__version__",
    "set_num_threads", "get_num_threads", "lr_scheduler", "EarlyStopping",
]
