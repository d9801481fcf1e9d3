"""The study's arms, each declared once: what the study compares against the baseline.

An arm is one entry of :data:`ARMS` plus its function. The entry says everything the rest of the
package needs: its name (the ``constraint`` column of every run frame), label and colour (tables and
figures), the config fields it adds and their checks, how it changes a :class:`~disentangle.config.RunConfig`,
what the model must capture for it, its loss, and the Markdown formula each section shows.

Two kinds:

- ``"constraint"``: a loss term over captured internals, ``weight × L``, with its weight and options
  as fields of ``ConstraintConfig`` (assembled from these entries); the model knows nothing about it
  (x-transformers style). Its ``loss`` reads a :class:`LossInputs`; ``state``, when given, builds a
  stateful helper (the MI estimator) that trains in alternation with the model.
- ``"architecture"``: a change to the model itself (a ``ModelConfig`` option, e.g. routed heads or
  entmax attention); ``changes`` gives the dotted config fields it sets. No loss, no weight: it is on
  or off, so sweeps and chosen weights do not apply to it.

Adding a constraint: write its function (``constraints.py``) and one :class:`Arm` entry here.

    from disentangle import arms
    arms.get("head_usage").label        # 'head usage'
    arms.constraint_names()             # ('orthogonality', 'mutual_information', ...)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from . import constraints as C
from .model import Encoder, EncoderOutput, ModelConfig
from .schema import at_least, one_of, positive

BASELINE = "baseline"
KINDS = ("constraint", "architecture")


@dataclass(frozen=True)
class Field:
    """One field an arm adds to ``ConstraintConfig``: its name, type, default and why (a comment)."""

    name: str
    type: type
    default: Any
    doc: str = ""
    # True for a field added after runs were first cached: at its default it is left out of the run
    # hash (its default must then compute exactly what the code did without it).
    added: bool = False


@dataclass
class LossInputs:
    """What a constraint's loss reads: the model's output (only what the arm asked to capture), the
    padding mask, the model (for weight-based losses), the layers the constraints act on, the run's
    ``ConstraintConfig`` and the arm's state (None unless the arm has one)."""

    out: EncoderOutput
    padding_mask: Tensor  # (B, T), True on padding
    model: Encoder
    layers: tuple[int, ...]
    cfg: Any  # ConstraintConfig
    state: Any = None

    def select(self, per_layer: list[Tensor]) -> list[Tensor]:
        return [per_layer[layer] for layer in self.layers]


@dataclass(frozen=True)
class Arm:
    name: str
    label: str
    colour: str
    kind: str
    formulas: Mapping[str, str]  # per variant ("" when the arm has none): Markdown shown in the report
    fields: tuple[Field, ...] = ()  # constraint arms: the weight first, named like the arm
    variant_field: str | None = None  # the field holding the arm's variant, if it has several
    variants: tuple[str, ...] = ()
    captures: Callable[[Any], frozenset[str]] = lambda cfg: frozenset()  # ConstraintConfig -> capture names
    loss: Callable[[LossInputs], Tensor] | None = None
    state: Callable[..., Any] | None = None  # (cfg, model_cfg, layers, device) -> state with auxiliary_step, state_dict
    step: Callable[[Any, LossInputs], dict[str, float]] | None = None  # (state, inputs) -> logs: its state's own step
    # (state, inputs) -> 0-dim tensor: what that step minimises (over the state's `estimator` module, with its
    # `optimizer`'s Adam), so the stacked engine can take it in the model's backward; None = the arm's runs
    # train alone
    objective: Callable[[Any, LossInputs], Tensor] | None = None
    checks: Callable[[Any], list[str]] = lambda cfg: []  # problems of its fields beyond the generic ones
    changes: Mapping[str, Any] = field(default_factory=dict)  # architecture arms: dotted RunConfig fields

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"arm {self.name!r}: kind={self.kind!r} is not one of {list(KINDS)}")
        if self.kind == "constraint" and (not self.fields or self.fields[0].name != self.name or self.loss is None):
            raise ValueError(f"arm {self.name!r}: a constraint needs a loss and its weight as the first field, named like it")

    def formula(self, variant: str | None = None) -> str:
        """The Markdown formula of ``variant`` (default: the arm's default variant)."""
        key = variant if variant is not None else self.default_variant
        if key not in self.formulas:
            raise KeyError(f"arm {self.name!r} has no formula for variant {key!r} (have: {list(self.formulas)})")
        return self.formulas[key]

    @property
    def default_variant(self) -> str:
        return next(f.default for f in self.fields if f.name == self.variant_field) if self.variant_field else ""

    def problems(self, cfg: Any) -> list[str]:
        """The generic checks (weight >= 0, a known variant) and the arm's own."""
        p: list[str] = []
        if self.kind == "constraint":
            p += at_least(self.name, getattr(cfg, self.name), 0.0)
        if self.variant_field:
            p += one_of(self.variant_field, getattr(cfg, self.variant_field), self.variants)
        return p + self.checks(cfg)

    def apply(self, cfg: Any, weight: float = 1.0, variant: str | None = None) -> Any:
        """``cfg`` (a RunConfig) with this arm on: a constraint at ``weight`` (and ``variant``), or an
        architectural arm's changes. A constraint at weight 0 is the unchanged config (the baseline)."""
        if self.kind == "architecture":
            return cfg.replace(**dict(self.changes))
        if weight == 0:
            return cfg
        extra: dict[str, Any] = {f"constraints.{self.name}": float(weight)}
        if self.variant_field and variant is not None:
            extra[f"constraints.{self.variant_field}"] = variant
        return cfg.replace(**extra)


# ------------------------------------------------------------------------------------- the entries


def _orthogonality_loss(x: LossInputs) -> Tensor:
    variant = x.cfg.orthogonality_variant
    if variant == "outputs":
        return C.orthogonality_outputs(x.select(x.out.head_out), x.padding_mask).loss
    if variant == "attention":
        return C.orthogonality_attention(x.select(x.out.attn), x.padding_mask).loss
    if variant == "contributions":
        return C.orthogonality_contributions(x.select(x.out.head_contrib), x.padding_mask).loss
    if variant == "published":
        return C.published_orthogonality(x.select(x.out.head_out), x.padding_mask).loss
    blocks = [w for which in x.cfg.orthogonality_on for w in x.select(x.model.per_head_weights(which))]
    return C.orthogonality_weights(blocks).loss


def _orthogonality_checks(cfg: Any) -> list[str]:
    if not cfg.orthogonality_on or set(cfg.orthogonality_on) - set("qkv"):
        return [f"orthogonality_on={cfg.orthogonality_on!r} must be a non-empty combination of 'q', 'k', 'v'"]
    return []


def _mi_checks(cfg: Any) -> list[str]:
    return [*positive("mi_temperature", cfg.mi_temperature), *positive("mi_hidden", cfg.mi_hidden), *positive("mi_lr", cfg.mi_lr)]


def _mi_state(cfg: Any, model_cfg: ModelConfig, layers: tuple[int, ...], device: Any) -> C.MIEstimator | None:
    if cfg.mi_variant == "published":  # a fixed cosine critic: nothing to train
        return None
    return C.MIEstimator(cfg.mi_variant, len(layers), model_cfg.n_heads, model_cfg.d_head,
                         cfg.mi_hidden, cfg.mi_temperature, cfg.mi_lr, device)


def _mi_step(state: C.MIEstimator, x: LossInputs) -> dict[str, float]:
    return state.auxiliary_step(x.select(x.out.head_out), x.padding_mask)


def _mi_objective(state: C.MIEstimator, x: LossInputs) -> Tensor:
    return state.objective(x.select(x.out.head_out), x.padding_mask)[0]


def _mi_loss(x: LossInputs) -> Tensor:
    if x.cfg.mi_variant == "published":
        return C.published_infonce(x.select(x.out.head_out), x.padding_mask).loss
    return x.state.loss(x.select(x.out.head_out), x.padding_mask)


def _usage_loss(x: LossInputs) -> Tensor:
    if x.cfg.head_usage_variant == "published":
        return C.published_head_usage(x.select(x.out.head_out), x.padding_mask).loss
    return C.head_usage_entropy(x.select(x.out.head_contrib), x.padding_mask).loss


ARMS: dict[str, Arm] = {
    arm.name: arm
    for arm in (
        Arm(
            "orthogonality", "orthogonality", "#1f77b4", "constraint",
            formulas={v: C.FORMULAS[f"orthogonality_{v}"] for v in C.ORTHOGONALITY_VARIANTS},
            fields=(
                Field("orthogonality", float, 0.0, "weight; 0 = off"),
                Field("orthogonality_variant", str, "outputs",
                      '"outputs" (z_h), "weights" (Q/K/V subspaces), "attention" (maps), "contributions" '
                      '(z_h W_O[h], basis-invariant) or "published" (the original study\'s loss)'),
                Field("orthogonality_on", str, "qkv", 'for variant "weights": which projections, any of "q", "k", "v"'),
            ),
            variant_field="orthogonality_variant", variants=C.ORTHOGONALITY_VARIANTS,
            captures=lambda cfg: frozenset({"outputs": {"head_out"}, "weights": set(), "attention": {"attn"},
                                            "contributions": {"head_contrib"}, "published": {"head_out"}}[cfg.orthogonality_variant]),
            loss=_orthogonality_loss, checks=_orthogonality_checks,
        ),
        Arm(
            "mutual_information", "mutual information", "#ff7f0e", "constraint",
            formulas={"infonce": C.FORMULAS["infonce"], "club": C.FORMULAS["club"], "published": C.FORMULAS["mi_published"]},
            fields=(
                Field("mutual_information", float, 0.0, "weight; 0 = off"),
                Field("mi_variant", str, "infonce", '"infonce" (lower bound, minimised), "club" (upper bound, Cheng et al. 2020) '
                      'or "published" (the original study\'s term, with its sign)'),
                Field("mi_temperature", float, 0.1, "InfoNCE critic: cosine similarity of learned projections / temperature"),
                # Both estimators need a trained network (InfoNCE's critic, CLUB's q), one per head pair, trained in
                # alternation with the model: a fixed critic cannot see dependence between heads' different bases.
                Field("mi_hidden", int, 32, "hidden (and, for InfoNCE, embedding) width of that network"),
                Field("mi_lr", float, 1e-3, "its learning rate"),
            ),
            variant_field="mi_variant", variants=C.MI_VARIANTS,
            captures=lambda cfg: frozenset({"head_out"}),
            loss=_mi_loss, state=_mi_state, step=_mi_step, objective=_mi_objective, checks=_mi_checks,
        ),
        Arm(
            "attention_entropy", "attention entropy", "#2ca02c", "constraint",
            formulas={"normalised": C.FORMULAS["attention_entropy"], "published": C.FORMULAS["attention_entropy_published"]},
            fields=(Field("attention_entropy", float, 0.0, "weight; 0 = off"),
                    Field("attention_entropy_variant", str, "normalised",
                          '"normalised" (by log n) or "published" (the original study\'s, in nats)', added=True)),
            variant_field="attention_entropy_variant", variants=C.ENTROPY_VARIANTS,
            captures=lambda cfg: frozenset({"attn"}),
            loss=lambda x: (C.published_attention_entropy if x.cfg.attention_entropy_variant == "published"
                            else C.attention_entropy)(x.select(x.out.attn), x.padding_mask).loss,
        ),
        Arm(
            "head_usage", "head usage", "#d62728", "constraint",
            formulas={"contributions": C.FORMULAS["head_usage"], "published": C.FORMULAS["head_usage_published"]},
            fields=(Field("head_usage", float, 0.0, "weight; 0 = off"),
                    Field("head_usage_variant", str, "contributions",
                          '"contributions" (norms of z_h W_O[h], normalised by log H) or "published" (norms of z_h, nats)', added=True)),
            variant_field="head_usage_variant", variants=C.USAGE_VARIANTS,
            captures=lambda cfg: frozenset({"head_out"} if cfg.head_usage_variant == "published" else {"head_contrib"}),
            loss=_usage_loss,
        ),
        # Architecture arms: a ModelConfig option, no constraint weight.
        Arm(
            "routed_heads", "routed heads (MoH)", "#17becf", "architecture",
            formulas={"": "**Routed heads (MoH, Jin et al. 2024)** — in the global layers, per token, a router "
                          "g = softmax(x W_r) over the routed heads keeps the top k, renormalised and times k; shared "
                          "heads are always on; [a₁, a₂] = 2·softmax(x W₀) mixes the two groups; each head's output zₕ "
                          "is multiplied by its gate before W_O. Trained with the load balance E·Σᵢ Pᵢ fᵢ (weight 0.01)."},
            changes={"model.routed_top_k": 3, "model.shared_heads": 2},  # of the default 8 heads: 2 shared + top 3 of 6
        ),
        Arm(
            "hopfield", "Hopfield memory", "#bcbd22", "architecture",
            formulas={"": "**Hopfield memory (Ramsauer et al. 2020)** — in each global block, after attention, M learned "
                          "stored patterns X; each token state ξ (layer-normalised, like X) is iterated "
                          "ξ ← Xᵀ softmax(β X ξ) to its fixed point (at most a few updates, until it moves less than a "
                          "tolerance) and the retrieved state is added to the residual stream. A token's attractor is the "
                          "stored pattern it converges to (softmax mass > 1/2), else it is metastable."},
            changes={"model.hopfield_patterns": 32},  # beta = 1/sqrt(d_model), hflayers' default
        ),
        Arm(
            "entmax15", "1.5-entmax attention", "#8c564b", "architecture",
            formulas={"": "**1.5-entmax attention** — in the global layers, Aₕ[q, ·] = 1.5-entmax(qₕ kₕᵀ / √d_head) "
                          "instead of softmax: p = [(s/2 − τ)]₊² with τ chosen so that Σ p = 1 (Peters et al. 2019), "
                          "which gives exact zeros. Sparsity is built in, not imposed by a penalty."},
            changes={"model.attention": "entmax15"},
        ),
        Arm(
            "entmax_alpha", "learned-α entmax attention", "#e377c2", "architecture",
            formulas={"": "**Learned-α entmax attention** — α-entmax in the global layers with α = 1 + sigmoid(aₕ) ∈ (1, 2) "
                          "learned per head, from 1.5 (Correia et al. 2019): each head finds its own sparsity, "
                          "between softmax (α → 1) and sparsemax (α = 2)."},
            changes={"model.attention": "entmax_alpha"},
        ),
    )
}

_BASELINE_COLOUR = "#333333"
_OTHER_COLOUR = "#7f7f7f"


def get(name: str) -> Arm:
    """The arm called ``name``; a clear error naming the known arms otherwise."""
    if name not in ARMS:
        raise KeyError(f"{name!r} is not an arm (known: {[BASELINE, *ARMS]})")
    return ARMS[name]


def constraint_names() -> tuple[str, ...]:
    """The constraint arms, in registry order (the order their loss terms are summed in)."""
    return tuple(n for n, a in ARMS.items() if a.kind == "constraint")


def names() -> tuple[str, ...]:
    return (BASELINE, *ARMS)


def label(name: str, weight: float | None = None) -> str:
    """Display name of an arm (names not in the registry, e.g. a combination "a+b", as they are), with
    its weight when given: ``label("head_usage", 0.3)`` -> ``'head usage (w=0.3)'``; the baseline and the
    architectural arms (which have no weight) never show one."""
    if name == BASELINE:
        return BASELINE
    text = ARMS[name].label if name in ARMS else name
    if weight is None or (name in ARMS and ARMS[name].kind == "architecture"):
        return text
    return f"{text} (w={weight:g})"


def colour(name: str) -> str:
    if name == BASELINE:
        return _BASELINE_COLOUR
    return ARMS[name].colour if name in ARMS else _OTHER_COLOUR


__all__ = ["ARMS", "BASELINE", "Arm", "Field", "LossInputs", "colour", "constraint_names", "get", "label", "names"]
