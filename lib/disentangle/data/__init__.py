"""Reasoning data: structures and encoding (``core``), the procedural tasks with ground truth
(``procedural``), the real bAbI reader (``babi``) and the config-to-data entry point (``load.build``).

The common structures are importable from here: ``from disentangle.data import Story, Split, TaskData``.
"""

from .core import (
    CLS,
    PAD,
    PUNCTUATION,
    SEP,
    SPECIALS,
    TENSOR_FIELDS,
    UNK,
    Example,
    Split,
    Story,
    TaskData,
    Vocab,
    answer_vocab,
    describe,
    encode,
    iter_batches,
    stack,
    tokenize,
)
from .load import build

__all__ = [
    "CLS", "PAD", "PUNCTUATION", "SEP", "SPECIALS", "TENSOR_FIELDS", "UNK", "Example", "Split", "Story",
    "TaskData", "Vocab", "answer_vocab", "build", "describe", "encode", "iter_batches", "stack", "tokenize",
]
