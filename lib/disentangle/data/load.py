"""The data of a run: a :class:`~disentangle.config.DataConfig` turned into :class:`TaskData`."""

from __future__ import annotations

from ..config import DataConfig
from .babi import load as load_babi
from .core import TaskData
from .procedural import generate


def build(cfg: DataConfig) -> TaskData:
    """Generated procedural tasks (``source="procedural"``) or the bAbI files of ``cfg.babi_dir``."""
    return generate(cfg) if cfg.source == "procedural" else load_babi(cfg)


__all__ = ["build"]
