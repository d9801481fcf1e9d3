"""Experiment definitions: validation, shared baseline configs, the chosen-weight rule, capacity arms."""

import pandas as pd
import pytest

from disentangle.config import ConfigError, run_hash
from disentangle.study import Study

TINY = dict(model={"d_model": 16, "n_heads": 2, "n_layers": 2, "d_ff": 32},
            data={"tasks": ["where_person"], "n_train": 64, "n_val": 16, "n_test": 16, "n_ood": 8},
            train={"steps": 10, "batch_size": 8, "eval_every": 5})


def study(**kw) -> Study:
    args = dict(TINY, seeds=[0, 1], sweep_weights={"orthogonality": [0.1, 1.0], "head_usage": [0.1, 1.0]},
                variants={"orthogonality": "attention"})
    return Study.from_parameters(**{**args, **kw})


def test_every_bad_parameter_is_reported_at_once():
    with pytest.raises(ConfigError) as err:
        Study.from_parameters(model={"d_model": 50, "n_heads": 4}, data={}, train={}, seeds=[],
                              sweep_weights={"sparsity": [1.0], "head_usage": [-1.0]},
                              variants={"orthogonality": "cosine", "head_usage": "x"})
    text = str(err.value)
    for problem in ("d_model=50 is not divisible by n_heads=4", "seeds is empty", "'sparsity' is not a constraint",
                    "sweep_weights.head_usage[0]=-1.0 must be >= 0", "variants.orthogonality='cosine'", "variants.head_usage='x' is not one of ['contributions', 'published']"):
        assert problem in text, problem


def test_weight_zero_is_the_baseline_config_whatever_the_constraint():
    s = study()
    baseline = run_hash(s.config(seed=1))
    assert run_hash(s.config("orthogonality", 0.0, 1)) == baseline
    assert run_hash(s.config("head_usage", 0.0, 1)) == baseline
    constrained = s.config("orthogonality", 1.0, 1)
    assert constrained.constraints.orthogonality_variant == "attention" and run_hash(constrained) != baseline
    assert s.sweep_weights["orthogonality"] == (0.0, 0.1, 1.0)  # 0 added, sorted


def synthetic_sweeps(accuracy: dict[tuple[str, float], float]) -> pd.DataFrame:
    rows = [{"sweep": c, "weight": w, "seed": seed, "test_acc": acc, "chance/where_person": 0.2,
             "status": "finished"}
            for (c, w), acc in accuracy.items() for seed in (0, 1)]
    return pd.DataFrame(rows)


def test_chosen_weight_is_the_largest_that_keeps_half_the_gain_over_chance(monkeypatch):
    s = study()
    sweeps = synthetic_sweeps({("orthogonality", 0.0): 0.9, ("orthogonality", 0.1): 0.85, ("orthogonality", 1.0): 0.5,
                               ("head_usage", 0.0): 0.9, ("head_usage", 0.1): 0.3, ("head_usage", 1.0): 0.2})
    monkeypatch.setattr(Study, "train_all_sweeps", lambda self: None)
    monkeypatch.setattr(Study, "sweeps", lambda self: (sweeps, pd.DataFrame()))
    chosen = s.chosen_weights().set_index("constraint")
    # orthogonality: 1.0 keeps (0.5 - 0.2) / (0.9 - 0.2) = 43% < 50%, so 0.1 (93%)
    assert chosen.loc["orthogonality", "weight"] == 0.1
    assert chosen.loc["orthogonality", "retained"] == pytest.approx(0.65 / 0.7)
    # head usage: no weight keeps half: the smallest one, and the rule says so
    assert chosen.loc["head_usage", "weight"] == 0.1 and "no weight retains" in chosen.loc["head_usage", "rule"]


@pytest.mark.parametrize("arms, ortho_acc, usage_high, grown", [
    ("all", 0.895, 0.75, {"baseline", "orthogonality", "head_usage"}),
    ("costly", 0.895, 0.75, {"baseline", "head_usage"}),  # orthogonality costs 0.005 < the 0.01 margin
    ("costly", 0.85, 0.75, {"baseline", "orthogonality", "head_usage"}),
    ("costliest", 0.85, 0.75, {"baseline", "head_usage"}),  # head usage surely costs >= 0.15, orthogonality 0.04
    ("costliest", 0.60, 0.75, {"baseline", "orthogonality"}),
    ("costliest", 0.895, 0.75, {"baseline", "head_usage"}),
    # head usage costs more on average, but its interval reaches up to 0.89: orthogonality's cost is surer
    ("costliest", 0.85, 0.89, {"baseline", "orthogonality"}),
    ("costliest", 0.85, float("nan"), {"baseline", "head_usage"}),  # no interval (one seed): the mean
])
def test_capacity_grows_the_arms_asked_for(monkeypatch, arms, ortho_acc, usage_high, grown):
    s = study()
    chosen = pd.DataFrame({"constraint": ["orthogonality", "head_usage"], "weight": [0.1, 1.0],
                           "test_acc": [ortho_acc, 0.70], "ci_high": [ortho_acc + 0.01, usage_high],
                           "baseline_acc": [0.9, 0.9]})
    monkeypatch.setattr(Study, "chosen_weights", lambda self, retain=0.5: chosen)
    asked = []

    def fake_run(self, configs, desc="runs"):
        asked.extend(configs)
        return pd.DataFrame({"run_id": [run_hash(c) for c in configs]}), pd.DataFrame()

    monkeypatch.setattr(Study, "run", fake_run)
    runs, _ = s.capacity({"model.d_ff": [16, 32, 64]}, arms=arms)
    from disentangle.study import constraint_of

    arms_at = {size: {constraint_of(c)[0] for c, sz in zip(asked, runs["size"]) if sz == size} for size in (16, 32, 64)}
    assert arms_at[32] == {"baseline", "orthogonality", "head_usage"}  # the default size: every arm, from the sweeps
    assert arms_at[16] == arms_at[64] == grown
    assert set(runs.loc[~runs["grown"], "size"]) <= {32}
    with pytest.raises(ConfigError, match="arms='some'"):
        s.capacity({"model.d_ff": [16]}, arms="some")


def test_loophole_table_is_each_variant_minus_the_baseline():
    from disentangle.study import loophole_table

    def frame(weights_values):
        return pd.DataFrame([{"weight": w, "status": "finished", "out": o, "attn": a} for w, o, a in weights_values])

    outputs = frame([(0.0, 0.5, 0.2), (0.0, 0.7, 0.4), (1.0, 0.1, 0.6), (1.0, 0.3, 0.8)])  # baseline means 0.6, 0.3
    contributions = frame([(1.0, 0.5, 0.3), (1.0, 0.5, 0.3)])
    t = loophole_table({"outputs": outputs, "contributions": contributions}, ["out", "attn"])
    assert t[["variant", "weight"]].values.tolist() == [["outputs", 1.0], ["contributions", 1.0]]
    assert t["out"].tolist() == pytest.approx([-0.4, -0.1]) and t["attn"].tolist() == pytest.approx([0.4, 0.0])
