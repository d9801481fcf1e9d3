"""The arms registry: every arm declared once, and everything else reading it."""

import dataclasses

import pytest
import torch

from disentangle import arms
from disentangle.config import ConfigError, ConstraintConfig, RunConfig, run_hash
from disentangle.constraints import FORMULAS
from disentangle.model import Encoder, ModelConfig
from disentangle.objective import Constraints
from disentangle.report import plots
from disentangle.study import CONSTRAINTS, Study


def test_the_four_constraints_in_summing_order_and_their_fields_make_the_config():
    assert arms.constraint_names() == ("orthogonality", "mutual_information", "attention_entropy", "head_usage")
    assert CONSTRAINTS == arms.constraint_names()
    declared = [f.name for a in arms.ARMS.values() for f in a.fields]
    assert ConstraintConfig.field_names() == [*declared, "layers"]
    defaults = {f.name: f.default for f in dataclasses.fields(ConstraintConfig)}
    assert defaults["orthogonality_variant"] == "outputs" and defaults["mi_lr"] == 1e-3 and defaults["layers"] == ()


def test_the_assembled_config_hashes_as_before():
    # The hash of the default run, recorded before ConstraintConfig was assembled from the registry
    # (CODE_VERSION 4): the registry changes where fields are declared, not what a run is.
    assert run_hash(RunConfig()) == "87cc305985f7c0a2"
    cfg = RunConfig().replace(**{"constraints.head_usage": 0.3, "constraints.mi_variant": "club"})
    assert RunConfig.from_dict(cfg.to_dict()) == cfg


def test_config_checks_come_from_the_arms_and_name_the_field():
    with pytest.raises(ConfigError) as err:
        ConstraintConfig(orthogonality=-1.0, orthogonality_variant="maps", mi_temperature=0.0, orthogonality_on="x")
    text = str(err.value)
    assert "orthogonality=-1.0 must be >= 0.0" in text
    assert "orthogonality_variant='maps' is not one of ['outputs', 'weights', 'attention', 'contributions', 'published']" in text
    assert "mi_temperature=0.0 must be > 0" in text and "orthogonality_on='x'" in text


def test_labels_colours_and_formulas():
    assert arms.label("baseline") == "baseline" and arms.label("head_usage") == "head usage"
    assert arms.label("mutual_information", 0.3) == "mutual information (w=0.3)"
    assert arms.label("a+b") == "a+b"  # not an arm: shown as it is
    colours = [arms.colour(n) for n in arms.names()]
    assert len(set(colours)) == len(colours) and plots.colour("head_usage") == arms.colour("head_usage")
    assert arms.get("orthogonality").formula() == FORMULAS["orthogonality_outputs"]
    assert arms.get("orthogonality").formula("attention") == FORMULAS["orthogonality_attention"]
    assert arms.get("mutual_information").formula("club") == FORMULAS["club"]
    with pytest.raises(KeyError, match="no formula for variant 'x'"):
        arms.get("orthogonality").formula("x")
    with pytest.raises(KeyError, match="'routing' is not an arm"):
        arms.get("routing")


def test_apply_sets_weight_and_variant_and_weight_zero_is_the_baseline():
    base = RunConfig()
    on = arms.get("orthogonality").apply(base, 0.5, "attention")
    assert on.constraints.orthogonality == 0.5 and on.constraints.orthogonality_variant == "attention"
    assert arms.get("head_usage").apply(base, 0.0) == base
    study = Study.from_parameters(model={}, data={}, train={}, seeds=[0], sweep_weights={"head_usage": [0.1]},
                                  variants={"orthogonality": "weights"})
    assert study.config("orthogonality", 0.2, 0) == arms.get("orthogonality").apply(base.replace(seed=0), 0.2, "weights")


def test_an_architecture_arm_changes_the_model_not_the_loss():
    arm = arms.Arm("wide", "wide FFN", "#000000", "architecture", formulas={"": "**Wide**"}, changes={"model.d_ff": 512})
    cfg = arm.apply(RunConfig())
    assert cfg.model.d_ff == 512 and cfg.constraints == RunConfig().constraints
    with pytest.raises(ValueError, match="kind='other'"):
        arms.Arm("x", "x", "#000", "other", formulas={})
    with pytest.raises(ValueError, match="needs a loss and its weight"):
        arms.Arm("x", "x", "#000", "constraint", formulas={})


def test_objective_sums_the_registry_losses_with_the_weights():
    model_cfg = ModelConfig(vocab_size=11, n_classes=3, d_model=16, n_heads=4, n_layers=2, d_ff=32, max_len=8, local_layers=0)
    torch.manual_seed(0)
    model = Encoder(model_cfg)
    tokens, pad = torch.randint(0, 11, (4, 8)), torch.zeros(4, 8, dtype=torch.bool)
    cfg = ConstraintConfig(attention_entropy=0.5, head_usage=2.0)
    constraints = Constraints(cfg, model_cfg)
    assert constraints.captures == frozenset({"attn", "head_contrib"}) and constraints.states == {}
    out = model(tokens, pad, capture=constraints.captures)
    total, terms = constraints.loss(out, pad, model)
    assert list(terms) == ["attention_entropy", "head_usage"]
    torch.testing.assert_close(total, torch.tensor(0.5 * terms["attention_entropy"] + 2.0 * terms["head_usage"]))


def test_fields_added_later_leave_existing_hashes_alone_until_set():
    # attention_entropy_variant and head_usage_variant came after runs were cached: at their defaults they
    # are left out of the hash (the default computes what the code did before), set they are in it.
    base = RunConfig()
    assert "attention_entropy_variant" in base.to_dict()["constraints"]
    assert "attention_entropy_variant" not in base.hash_dict()["constraints"]
    assert run_hash(base) == "87cc305985f7c0a2"
    published = base.replace(**{"constraints.attention_entropy_variant": "published"})
    assert published.hash_dict()["constraints"]["attention_entropy_variant"] == "published"
    assert run_hash(published) != run_hash(base)


def test_the_architectural_arms_are_valid_configs_that_change_only_the_model():
    base = RunConfig()
    names = [n for n, a in arms.ARMS.items() if a.kind == "architecture"]
    assert names == ["routed_heads", "hopfield", "entmax15", "entmax_alpha"]
    hashes = {run_hash(base)}
    for name in names:
        cfg = arms.get(name).apply(base)
        assert cfg.constraints == base.constraints and cfg.data == base.data and cfg.train == base.train, name
        assert cfg.model != base.model and RunConfig.from_dict(cfg.to_dict()) == cfg, name
        hashes.add(run_hash(cfg))
        assert arms.label(name, float("nan")) == arms.get(name).label  # no weight shown: they have none
        assert arms.get(name).formula().startswith("**")
    assert len(hashes) == len(names) + 1 and run_hash(base) == "87cc305985f7c0a2"  # the default run is unchanged
    routed = arms.get("routed_heads").apply(base).model
    assert (routed.routed_top_k, routed.shared_heads, routed.routing_balance) == (3, 2, 0.01)
    assert arms.get("hopfield").apply(base).model.hopfield_patterns == 32
    assert "entmax_alpha" not in base.hash_dict()["model"]  # added later: out of the hash at its default
