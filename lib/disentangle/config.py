"""Configs for one run: model, data, training, constraints and seed; YAML in and out; the run hash.

A :class:`RunConfig` is frozen. Its :func:`run_hash` (over the full config and :data:`CODE_VERSION`)
names the run's cache folder, so two notebooks asking for the same run share it.

    cfg = RunConfig.from_dict(yaml.safe_load(text))       # unknown keys and bad values -> ConfigError
    cfg2 = cfg.replace(**{"constraints.head_usage": 0.1})  # a variant of it
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, make_dataclass
from pathlib import Path
from typing import Any, ClassVar

import yaml

from .arms import ARMS, constraint_names
from .constraints import MI_VARIANTS, ORTHOGONALITY_VARIANTS  # noqa: F401 (re-exported)
from .model import ModelConfig
from .schema import Config, ConfigError, at_least, one_of, positive

# Bump when a change to the code changes what a run computes (training loop, losses, data): old cache
# entries then stop matching instead of being silently reused.
CODE_VERSION = "4"

PROCEDURAL_TASKS = ("where_person", "where_object", "coreference", "counting", "majority", "deduction")


@dataclass(frozen=True)
class DataConfig(Config):
    source: str = "procedural"  # "procedural": generated here with ground-truth supporting tokens; "babi": files in babi_dir
    # Procedural task names, or bAbI task ids like "qa1"; all are trained jointly in one model. The default is
    # the two lookup tasks the CPU budget can teach to >= 95%: each lookup task costs a small encoder ~50k
    # examples of its own (no transfer between tasks), so six tasks need ~6x the steps (params/full.yaml).
    tasks: tuple[str, ...] = ("where_person", "coreference")
    n_train: int = 5000  # training examples per task (bAbI: at most this many; 0 = the whole file)
    n_val: int = 200  # validation examples per task (bAbI: held out from the end of the train file)
    n_test: int = 500  # test examples per task (bAbI: at most this many; 0 = the whole file)
    n_ood: int = 200  # per task, stories longer than any in training (procedural only)
    n_people: int = 3  # people in one story, drawn from 16 names (half boys, half girls); deduction: named animals (of 8)
    n_places: int = 4  # places in one story, drawn from 8 (2..8)
    n_objects: int = 4  # objects in one story, drawn from 8; deduction: animal species (of 8)
    story_min: int = 2  # sentences per story before distractors, inclusive range
    story_max: int = 3  # short stories keep a CPU run at ~25 s; the OOD split tests longer ones
    n_distractors: int = 0  # extra sentences about entities the question does not involve
    ood_story_min: int = 5  # story length range of the out-of-distribution split
    ood_story_max: int = 7
    seed: int = 0  # data seed, separate from the run seed: seeds then measure training variance only
    babi_dir: str = ""  # directory of bAbI v1.2 files (e.g. ../shared/data/babi/en); source="babi" only
    babi_max_sentences: int = 20  # keep the last N sentences of long bAbI stories (supporting facts always kept)
    # How a bAbI story becomes tokens. "project": [CLS] story [SEP] question [SEP], vocabulary from the train
    # files. "published" (the original study, references/seed-study.md): every sentence followed by a sentence
    # separator <ssep>, then [SEP] and the question; the last babi_max_sentences sentences (older supporting facts
    # are cut too); the LAST babi_max_tokens tokens; vocabulary from train + test. Added later: out of the hash.
    babi_format: str = field(default="project", metadata={"added": True})
    babi_max_tokens: int = field(default=180, metadata={"added": True})  # babi_format="published" only

    def problems(self) -> list[str]:
        p = one_of("source", self.source, ("procedural", "babi"))
        if not self.tasks:
            p.append("tasks is empty: name at least one task")
        if self.source == "procedural":
            p += [f"tasks: {t!r} is not one of {list(PROCEDURAL_TASKS)}" for t in self.tasks if t not in PROCEDURAL_TASKS]
            for name in ("n_train", "n_val", "n_test", "n_people", "n_places", "n_objects", "story_min"):
                p += positive(name, getattr(self, name))
            p += at_least("n_people", self.n_people, 2)
            p += at_least("n_ood", self.n_ood, 0)
            p += at_least("n_distractors", self.n_distractors, 0)
            if self.story_max < self.story_min:
                p.append(f"story_max={self.story_max} must be >= story_min={self.story_min}")
            if self.ood_story_min <= self.story_max:
                p.append(f"ood_story_min={self.ood_story_min} must be > story_max={self.story_max} (OOD stories are longer than training ones)")
            if self.ood_story_max < self.ood_story_min:
                p.append(f"ood_story_max={self.ood_story_max} must be >= ood_story_min={self.ood_story_min}")
        elif self.source == "babi":
            bad = [t for t in self.tasks if not (t.startswith("qa") and t[2:].isdigit() and 1 <= int(t[2:]) <= 20)]
            p += [f"tasks: {t!r} is not a bAbI task id (allowed: qa1 .. qa20)" for t in bad]
            if not self.babi_dir:
                p.append("babi_dir is empty: give the directory of the bAbI files (e.g. ../shared/data/babi/en)")
            for name in ("n_train", "n_test"):
                p += at_least(name, getattr(self, name), 0)
            # n_val=0: no validation split held out (the original study trains on the whole train file); the
            # learning curve is then read on the test split and early stopping is refused (RunConfig.problems)
            p += at_least("n_val", self.n_val, 0)
            p += positive("babi_max_sentences", self.babi_max_sentences)
            p += one_of("babi_format", self.babi_format, ("project", "published"))
            p += positive("babi_max_tokens", self.babi_max_tokens)
        return p


@dataclass(frozen=True)
class TrainConfig(Config):
    steps: int = 3200  # optimiser steps (the run may stop earlier on early stopping or divergence)
    batch_size: int = 16  # small batches learn these lookups in fewer examples than large ones
    lr: float = 1.5e-3  # peak AdamW learning rate, reached after warm-up (3e-3 and above learn markedly slower)
    weight_decay: float = 0.01
    warmup_steps: int = 200  # linear warm-up from 0, then cosine decay to min_lr_ratio * lr
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    eval_every: int = 400  # steps between validation evaluations (and checkpoints)
    early_stopping: int = 0  # stop after this many evaluations without a better val accuracy; 0 = off
    device: str = "auto"  # "auto" (CUDA when available), "cpu", "cuda" or "cuda:N"
    amp: str = "auto"  # mixed precision: "auto" (bf16 on CUDA, off on CPU), "off", "bf16"
    # Fields added later (out of the run hash at their defaults, which compute what the code did before them).
    # Which parameters weight decay acts on: "matrices" (projections and embeddings, not biases and LayerNorm
    # gains: nanoGPT's rule) or "all" (torch.optim.AdamW over model.parameters(), as the original study).
    weight_decay_on: str = field(default="matrices", metadata={"added": True})
    # How batches are drawn: "iid" (uniformly with replacement, a pure function of (seed, step); see
    # train._batch_indices for why) or "epochs" (a fresh permutation every epoch, ceil(n / batch_size) batches,
    # the last one smaller: a shuffled DataLoader, as the original study).
    batch_order: str = field(default="iid", metadata={"added": True})
    adam_beta2: float = field(default=0.98, metadata={"added": True})  # AdamW's beta2 (torch's default: 0.999)
    # Early stopping may not stop a run before this step. A model that sits at chance for its first epochs
    # (the replication's bAbI runs: ~100 steps) otherwise "converges" on its plateau; 0 = no floor.
    min_steps: int = field(default=0, metadata={"added": True})

    def problems(self) -> list[str]:
        p: list[str] = []
        for name in ("steps", "batch_size", "eval_every"):
            p += positive(name, getattr(self, name))
        p += positive("lr", self.lr)
        for name in ("weight_decay", "warmup_steps", "grad_clip", "early_stopping", "min_steps"):
            p += at_least(name, getattr(self, name), 0)
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            p.append(f"min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        if not (self.device in ("auto", "cpu", "cuda") or (self.device.startswith("cuda:") and self.device[5:].isdigit())):
            p.append(f"device={self.device!r} is not one of ['auto', 'cpu', 'cuda', 'cuda:N']")
        p += one_of("amp", self.amp, ("auto", "off", "bf16"))
        p += one_of("weight_decay_on", self.weight_decay_on, ("matrices", "all"))
        p += one_of("batch_order", self.batch_order, ("iid", "epochs"))
        if not 0.0 < self.adam_beta2 < 1.0:
            p.append(f"adam_beta2={self.adam_beta2} must be in (0, 1)")
        if self.min_steps > self.steps:
            p.append(f"min_steps={self.min_steps} must be at most steps={self.steps}")
        return p


def _constraint_problems(self) -> list[str]:
    p: list[str] = []
    for arm in ARMS.values():
        if arm.fields:
            p += arm.problems(self)
    return p + [f"layers: {layer} must be >= 0" for layer in self.layers if layer < 0]


def _active(self) -> dict[str, float]:
    """The constraints with a non-zero weight, by name, in registry order."""
    return {n: getattr(self, n) for n in constraint_names() if getattr(self, n) > 0}


# The constraints' weights and options, one group of fields per constraint arm of the registry (arms.py:
# each field's default and why are declared there), plus the layers they act on. Assembled rather than
# written out so that adding a constraint is one registry entry; the fields and the run hash are the
# same as a hand-written dataclass with these fields in this order.
ConstraintConfig = make_dataclass(
    "ConstraintConfig",
    [(f.name, f.type, field(default=f.default, metadata={"doc": f.doc, "added": f.added})) for arm in ARMS.values() for f in arm.fields]
    + [("layers", tuple[int, ...], field(default=(), metadata={
        "doc": "layers the constraints act on; empty = every global (not sentence-local) layer"}))],
    bases=(Config,),
    frozen=True,
    namespace={"problems": _constraint_problems, "active": _active, "__module__": __name__,
               "__doc__": "Weights of the head constraints (0 = off) and their options; Loss = CE + Σ weight × constraint.\n\n"
                          + "\n".join(f"- ``{f.name}`` = {f.default!r}: {f.doc}" for arm in ARMS.values() for f in arm.fields)},
)


@dataclass(frozen=True)
class RunConfig(Config):
    """One training run: everything that determines its numbers."""

    _nested: ClassVar[dict[str, type[Config]]] = {
        "model": ModelConfig,
        "data": DataConfig,
        "train": TrainConfig,
        "constraints": ConstraintConfig,
    }

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    constraints: ConstraintConfig = field(default_factory=ConstraintConfig)
    seed: int = 0  # initialisation, batch order, dropout

    def problems(self) -> list[str]:
        bad = [layer for layer in self.constraints.layers if layer >= self.model.n_layers]
        p = [f"constraints.layers: {layer} is not a layer (model.n_layers={self.model.n_layers})" for layer in bad]
        if self.data.source == "babi" and self.data.n_val == 0 and self.train.early_stopping > 0:
            p.append(f"train.early_stopping={self.train.early_stopping} needs a validation split: data.n_val=0 holds "
                     "none out (its learning curve is read on the test split); set data.n_val > 0 or early_stopping: 0")
        return p


def run_hash(cfg: RunConfig) -> str:
    """Stable 16-hex-digit id of a run: its full config plus CODE_VERSION (fields added later, at their
    default, left out: :meth:`~disentangle.schema.Config.hash_dict`)."""
    payload = json.dumps({"code_version": CODE_VERSION, "config": cfg.hash_dict()}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"model": {"d_ff": 128}}`` -> ``{"model.d_ff": 128}``; lists become tuples (hashable columns)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, f"{key}."))
        else:
            out[key] = tuple(v) if isinstance(v, list) else v
    return out


def load_yaml(path: str | Path) -> RunConfig:
    with open(path) as f:
        return RunConfig.from_dict(yaml.safe_load(f) or {})


def dump_yaml(cfg: RunConfig, path: str | Path | None = None) -> str:
    text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    if path is not None:
        Path(path).write_text(text)
    return text


__all__ = [
    "CODE_VERSION",
    "ConfigError",
    "ConstraintConfig",
    "DataConfig",
    "ModelConfig",
    "RunConfig",
    "TrainConfig",
    "dump_yaml",
    "flatten",
    "load_yaml",
    "run_hash",
]
