"""The training objective's extra terms: Σ weight × loss over the run's active constraint arms.

    constraints = Constraints(cfg.constraints, model_cfg, device=device)
    out = model(tokens, padding_mask, capture=constraints.captures)   # only what the active losses read
    penalty, terms = constraints.loss(out, padding_mask, model)       # terms: raw values, for logging
    (F.cross_entropy(out.logits, answers) + penalty).backward(); opt.step()
    constraints.auxiliary_step(out, padding_mask)                     # the MI estimator, in alternation

Everything arm-specific (what to capture, the loss, a state such as the MI estimator) comes from the
registry (:mod:`disentangle.arms`); this object only selects the layers, sums and keeps the states.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import arms as arms_mod
from .config import ConstraintConfig
from .constraints import _floats
from .model import Encoder, EncoderOutput, ModelConfig


# The ModelConfig field weighting each loss an architecture asks for (EncoderOutput.aux).
_AUX_WEIGHTS = {"load_balance": "routing_balance"}


class Constraints:
    """What the training loop uses. Built from the run's config.

    Holds the weights of the active constraint arms, the layers the constraints act on
    (``ConstraintConfig.layers``, empty = every global layer), what the model must capture, and the
    arms' states (the MI estimator's networks and optimiser), which belong here and not in the model.
    """

    def __init__(self, cfg: ConstraintConfig, model_cfg: ModelConfig, device: torch.device | str | None = None):
        bad = [layer for layer in cfg.layers if not 0 <= layer < model_cfg.n_layers]
        if bad:
            raise ValueError(f"constraints.layers: {bad} are not layers (model.n_layers={model_cfg.n_layers})")
        self.cfg = cfg
        self.weights = cfg.active()
        # Default: the global layers. A sentence-local layer sees one sentence at a time, so its heads cannot
        # take part in cross-sentence reasoning; constraining them is opt-in (list them in cfg.layers).
        self.layers = tuple(cfg.layers) or tuple(range(model_cfg.local_layers, model_cfg.n_layers))
        self.arms = {name: arms_mod.get(name) for name in arms_mod.constraint_names() if name in self.weights}
        self.captures: frozenset[str] = frozenset().union(*(a.captures(cfg) for a in self.arms.values()))
        # Built in registry order from the global RNG, so the run's seed fixes every state.
        states = {name: a.state(cfg, model_cfg, self.layers, device) for name, a in self.arms.items() if a.state}
        self.states = {name: st for name, st in states.items() if st is not None}  # e.g. no estimator to train

    def _inputs(self, name: str, out: EncoderOutput, padding_mask: Tensor, model: Encoder) -> arms_mod.LossInputs:
        return arms_mod.LossInputs(out, padding_mask, model, self.layers, self.cfg, self.states.get(name))

    def raw(self, out: EncoderOutput, padding_mask: Tensor, model: Encoder) -> dict[str, Tensor]:
        """Each active constraint's raw (unweighted) loss keyed by its arm's name, in registry order, then the
        architecture's own losses (``out.aux``, e.g. the routed heads' load balance): 0-dim tensors."""
        raw = {name: arm.loss(self._inputs(name, out, padding_mask, model)) for name, arm in self.arms.items()}
        return {**raw, **out.aux}

    def weight(self, name: str, model: Encoder) -> float:
        """The weight of a term of :meth:`raw`: the constraint's, or the ModelConfig field of an aux loss."""
        return self.weights[name] if name in self.weights else getattr(model.cfg, _AUX_WEIGHTS[name])

    def loss(self, out: EncoderOutput, padding_mask: Tensor, model: Encoder) -> tuple[Tensor, dict[str, float]]:
        """Σ weight × constraint over the active constraints, in registry order: a 0-dim float32 tensor,
        exactly 0.0 when none is active (so CE + it == CE bit for bit), and each active constraint's raw
        (unweighted) value keyed by its arm's name."""
        total = torch.zeros((), device=out.logits.device)
        raw = self.raw(out, padding_mask, model)
        for name, value in raw.items():
            total = total + self.weight(name, model) * value
        return total, _floats(**raw)

    def auxiliary_step(self, out: EncoderOutput, padding_mask: Tensor, model: Encoder | None = None) -> dict[str, float]:
        """One step of every arm state's own training (the MI estimator, on detached representations,
        alternating with the model's step); {} when no active arm has a state."""
        logs: dict[str, float] = {}
        for name, state in self.states.items():
            logs.update(self.arms[name].step(state, self._inputs(name, out, padding_mask, model)))
        return logs

    def objectives(self, out: EncoderOutput, padding_mask: Tensor, model: Encoder) -> dict[str, Tensor]:
        """What each arm state's own step minimises (on detached representations), by arm name: what
        :meth:`auxiliary_step` takes one optimiser step on, for the stacked engine's single backward pass."""
        return {name: self.arms[name].objective(state, self._inputs(name, out, padding_mask, model))
                for name, state in self.states.items()}

    def state_dict(self) -> dict:
        """The arms' states ({} without any), for exact checkpoint/resume. One state (the MI estimator)
        is stored flat, as before the registry, so older checkpoints still resume."""
        if not self.states:
            return {}
        if len(self.states) == 1:
            return next(iter(self.states.values())).state_dict()
        return {name: s.state_dict() for name, s in self.states.items()}

    def load_state_dict(self, state: dict) -> None:
        if not self.states:
            if state:
                raise ValueError(f"state has {sorted(state)} but this run's constraints have no state (no MI estimator)")
            return
        if len(self.states) == 1:
            next(iter(self.states.values())).load_state_dict(state)
            return
        for name, s in self.states.items():
            s.load_state_dict(state[name])


__all__ = ["Constraints"]
