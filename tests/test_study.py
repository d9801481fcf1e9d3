"""Experiment definitions: validation, shared baseline configs, the chosen-weight rule, capacity arms."""

import math

import pandas as pd
import pytest

from disentangle.config import ConfigError, RunConfig, run_hash
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


def test_architectural_arms_are_named_by_their_config_not_called_baseline():
    from disentangle import arms
    from disentangle.study import architecture_of, constraint_of

    base = RunConfig()
    for name in ("routed_heads", "hopfield", "entmax15", "entmax_alpha"):
        got, weight = constraint_of(arms.get(name).apply(base))
        assert got == name and math.isnan(weight)  # no weight: never mistaken for a weight-0 baseline
    assert constraint_of(base) == ("baseline", 0.0)
    # other settings of an arm are the arm (a 4-head model's top-k without shared heads, a sweep point)
    assert architecture_of(base.replace(**{"model.routed_top_k": 2})) == "routed_heads"
    assert architecture_of(base.replace(**{"model.entmax_alpha": 1.2})) is None  # alpha means nothing under softmax
    assert architecture_of(base.replace(**{"model.attention": "entmax15", "model.hopfield_patterns": 4})) == "entmax15+hopfield"


def _fake_runs(accuracy):
    """A Study.run stand-in: every config 'trains' to accuracy(constraint weight) at once (chance 0.25)."""
    asked = []

    def run(configs, desc="runs"):
        asked.append(list(configs))
        rows = []
        for c in configs:
            active = c.constraints.active()
            w = next(iter(active.values())) if active else 0.0
            rows.append({"run_id": run_hash(c), "constraint": next(iter(active), "baseline"), "weight": w, "seed": c.seed,
                         "status": "finished", "test_acc": accuracy(w), "chance/where_person": 0.25})
        return pd.DataFrame(rows), pd.DataFrame()

    return run, asked


def test_the_sweep_is_extended_until_a_weight_fails_the_choice_rule(monkeypatch):
    s = study(sweep_weights={"orthogonality": [0.03, 0.3, 3.0]}, sweep_bracket=2)
    run, asked = _fake_runs(lambda w: 0.95 if w < 10 else 0.30)  # 30 keeps (0.30 - 0.25) / 0.70 < half the gain
    monkeypatch.setattr(s, "run", run)
    chosen = s.chosen_weights().set_index("constraint").loc["orthogonality"]
    assert s.sweep_weights["orthogonality"] == (0.0, 0.03, 0.3, 3.0, 30.0)  # one step of the sweep's own spacing
    assert chosen["weight"] == 3.0 and chosen["bracketed"] and chosen["next_weight"] == 30.0
    assert chosen["next_retained"] == pytest.approx(0.05 / 0.70)
    assert chosen["decided"] and chosen["retained_low"] == pytest.approx(1.0)  # every seed alike: no doubt
    # the sweep (4 weights incl. 0, 2 seeds), then with the new weight; bracketing stops when a weight fails
    # (later calls only read the same 10 runs back)
    assert [len(a) for a in asked[:2]] == [8, 10] and all(len(a) == 10 for a in asked[2:])

    s = study(sweep_weights={"orthogonality": [0.03, 0.3, 3.0]}, sweep_bracket=2)
    run, _ = _fake_runs(lambda w: 0.95)  # nothing ever fails: at most sweep_bracket weights are added
    monkeypatch.setattr(s, "run", run)
    chosen = s.chosen_weights().set_index("constraint").loc["orthogonality"]
    assert s.sweep_weights["orthogonality"][-2:] == (30.0, 300.0)
    assert chosen["weight"] == 300.0 and not chosen["bracketed"] and math.isnan(chosen["next_weight"])

    s = study(sweep_weights={"orthogonality": [0.03, 0.3, 3.0]})  # sweep_bracket 0: the sweep as given
    run, _ = _fake_runs(lambda w: 0.95)
    monkeypatch.setattr(s, "run", run)
    assert s.chosen_weights()["weight"].tolist() == [3.0] and s.sweep_weights["orthogonality"][-1] == 3.0


def test_sweep_bracket_must_be_a_non_negative_integer():
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ConfigError, match="sweep_bracket="):
            study(sweep_bracket=bad)


def test_the_costliest_arm_comes_with_its_margin_over_the_runner_up(monkeypatch):
    def fake(acc):
        def run(configs, desc="runs"):
            rows = []
            for c in configs:
                active = c.constraints.active()
                name, w = next(iter(active.items())) if active else ("baseline", 0.0)
                rows.append({"run_id": run_hash(c), "constraint": name, "weight": w, "seed": c.seed, "status": "finished",
                             "test_acc": acc(name, c.seed), "chance/where_person": 0.25})
            return pd.DataFrame(rows), pd.DataFrame()
        return run

    s = study(sweep_weights={"orthogonality": [1.0], "head_usage": [1.0]}, seeds=[0, 1, 2])
    monkeypatch.setattr(s, "run", fake(lambda name, seed: {"baseline": 0.95, "orthogonality": 0.75, "head_usage": 0.85}[name] + 0.01 * seed))
    top = s.costliest()
    assert (top["constraint"], top["runner_up"], top["n"]) == ("orthogonality", "head_usage", 3)
    assert top["margin"] == pytest.approx(0.10) and top["decided"]  # 0.10 more accurate on every seed
    s = study(sweep_weights={"orthogonality": [1.0], "head_usage": [1.0]}, seeds=[0, 1, 2])
    noisy = {"orthogonality": [0.70, 0.90, 0.80], "head_usage": [0.85, 0.75, 0.80]}
    monkeypatch.setattr(s, "run", fake(lambda name, seed: 0.95 if name == "baseline" else noisy[name][seed]))
    top = s.costliest()
    assert top["runner_up"] is not None and not top["decided"] and top["ci_low"] < 0 < top["ci_high"]


def test_loophole_table_is_each_variant_minus_the_baseline():
    from disentangle.study import loophole_table

    def frame(weights_values):
        return pd.DataFrame([{"weight": w, "status": "finished", "out": o, "attn": a} for w, o, a in weights_values])

    outputs = frame([(0.0, 0.5, 0.2), (0.0, 0.7, 0.4), (1.0, 0.1, 0.6), (1.0, 0.3, 0.8)])  # baseline means 0.6, 0.3
    contributions = frame([(1.0, 0.5, 0.3), (1.0, 0.5, 0.3)])
    t = loophole_table({"outputs": outputs, "contributions": contributions}, ["out", "attn"])
    assert t[["variant", "weight"]].values.tolist() == [["outputs", 1.0], ["contributions", 1.0]]
    assert t["out"].tolist() == pytest.approx([-0.4, -0.1]) and t["attn"].tolist() == pytest.approx([0.4, 0.0])
