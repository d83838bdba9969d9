"""Models faults are injected into, and their training at cluster scale.

Public surface: :func:`build_model`, :func:`load_checkpoint`, :class:`TrainConfig`; the CLIs are
``python -m trainers.train`` and ``python -m trainers.tune``.
"""

from trainers.checkpoint import load_checkpoint
from trainers.config import TrainConfig
from trainers.models import build_model

__all__ = ["TrainConfig", "build_model", "load_checkpoint"]
