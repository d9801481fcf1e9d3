"""The stacked engine: a run inside a stack is the same run as alone (per step, per constraint, per result),
reproducible, resumable after a kill, and a diverging run is frozen while the others go on."""

import json
import math
import time

import pandas as pd
import pytest
import torch
from numerics import tol

from disentangle import train as T
from disentangle.config import RunConfig, run_hash
from disentangle.stack import _Stack, plan, run_cost, stack_key
from disentangle.stats import mean_ci
from disentangle.train import run_grid

from test_constraints import _one_thread  # noqa: F401 (autouse fixture: one intra-op thread)
from test_train import TINY as TRAIN_TINY

# test_train's tiny run at a learning rate whose dynamics do not amplify rounding (see the per-step test)
TINY = {**TRAIN_TINY, "train": {**TRAIN_TINY["train"], "lr": 1e-3}}


def tiny(**changes) -> RunConfig:
    return RunConfig.from_dict(TINY).replace(**changes)


def _prepared(cfgs, cache):
    data = T.load_data(cfgs[0].data, cache)
    return [T._prepare(c, run_hash(c), cache / run_hash(c), cache, data) for c in cfgs]


def test_stack_keys_group_by_shape_and_arms_and_leave_unstackable_runs_alone():
    base = tiny()
    same = [base.replace(seed=3), base.replace(**{"train.lr": 5e-3})]
    assert all(stack_key(c) == stack_key(base) for c in same)
    assert stack_key(base.replace(**{"constraints.orthogonality": 0.1})) == stack_key(base.replace(**{"constraints.orthogonality": 3.0}))
    different = [base.replace(**{"model.d_ff": 64}), base.replace(**{"train.batch_size": 8}), base.replace(**{"constraints.orthogonality": 0.1}),
                 base.replace(**{"constraints.orthogonality": 0.1, "constraints.orthogonality_variant": "weights"})]
    assert len({stack_key(c) for c in [base, *different]}) == 5
    for alone in [base.replace(**{"model.attention": "entmax15"}), base.replace(**{"model.hopfield_patterns": 4}),
                  base.replace(**{"model.dropout": 0.1})]:
        assert stack_key(alone) is None
    for variant in ("infonce", "club", "published"):
        assert stack_key(base.replace(**{"constraints.mutual_information": 0.1, "constraints.mi_variant": variant})) is not None


def test_plan_splits_groups_evenly_and_gives_every_worker_work():
    cfgs = [tiny(seed=s) for s in range(9)] + [tiny(seed=s, **{"model.dropout": 0.1}) for s in range(2)]
    sizes = sorted(len(s) for s in plan(cfgs, n_workers=1, max_runs=8))
    assert sizes == [1, 1, 4, 5]  # 9 at a cap of 8: 5 + 4, not 8 + 1; dropout runs alone
    assert sorted(len(s) for s in plan(cfgs, n_workers=2, max_runs=None)) == [1, 1, 4, 5]  # cap ceil(11 / 2) = 6
    assert sorted(len(s) for s in plan(cfgs, n_workers=4, max_runs=None)) == [1, 1, 3, 3, 3]  # cap 3
    assert sum(len(s) for s in plan(cfgs, 4, None)) == len(cfgs)


def test_plan_hands_out_the_most_work_first():
    # 2 runs of a model 4x wider cost more than 3 tiny ones: they go first, so no core idles behind them at the end
    big = [tiny(seed=s, **{"model.d_model": 64, "model.d_ff": 256}) for s in range(2)]
    small = [tiny(seed=s) for s in range(3)]
    longer = [tiny(seed=0, **{"model.dropout": 0.1, "train.steps": 30 * tiny().train.steps})]  # alone, but long
    stacks = plan(small + big + longer, n_workers=1, max_runs=None)
    assert [len(s) for s in stacks] == [1, 2, 3] and stacks[0] == longer and stacks[1] == big
    assert run_cost(big[0]) > 1.5 * run_cost(small[0])
    # learned-alpha entmax runs alone (no vmap rule) and costs 2.7 softmax steps: handed out before a softmax run
    entmax = tiny(seed=0, **{"model.attention": "entmax_alpha"})
    assert plan([small[0], entmax], n_workers=2, max_runs=None)[0] == [entmax]


def test_the_stack_size_cap_comes_from_the_environment_and_is_checked(monkeypatch):
    from disentangle.stack import default_max_runs

    assert default_max_runs(tiny()) is None  # a CPU: no cap beyond the share of the workers
    monkeypatch.setenv("DISENTANGLE_MAX_STACK", "4")
    assert default_max_runs(tiny()) == 4
    assert sorted(len(s) for s in plan([tiny(seed=s) for s in range(9)], 1, default_max_runs(tiny()))) == [3, 3, 3]
    monkeypatch.setenv("DISENTANGLE_MAX_STACK", "lots")
    with pytest.raises(ValueError, match="DISENTANGLE_MAX_STACK='lots' must be a positive integer"):
        default_max_runs(tiny())


STACKED_CONSTRAINTS = [
    ("orthogonality", "outputs"), ("orthogonality", "weights"), ("orthogonality", "attention"),
    ("orthogonality", "contributions"), ("orthogonality", "published"), ("mutual_information", "published"),
    ("mutual_information", "infonce"), ("mutual_information", "club"),
    ("attention_entropy", "normalised"), ("attention_entropy", "published"),
    ("head_usage", "contributions"), ("head_usage", "published"),
]


@pytest.mark.parametrize("arm,variant", STACKED_CONSTRAINTS)
def test_every_stackable_constraint_gives_each_run_its_own_loss_and_gradient(tmp_path, arm, variant):
    field = {"orthogonality": "orthogonality_variant", "mutual_information": "mi_variant",
             "attention_entropy": "attention_entropy_variant", "head_usage": "head_usage_variant"}[arm]
    cfgs = [tiny(seed=s, **{f"constraints.{arm}": w, f"constraints.{field}": variant}) for s, w in [(0, 0.1), (1, 1.0), (2, 3.0)]]
    assert len({stack_key(c) for c in cfgs}) == 1
    runs = _prepared(cfgs, tmp_path)
    st = _Stack(runs)
    b = st._batch()
    loss, ce, raw, _ = st.losses(b)
    loss.sum().backward()
    for i, r in enumerate(runs):
        out = r.model(b["tokens"][i], b["padding_mask"][i], capture=r.constraints.captures, segments=b["segments"][i])
        solo_ce = torch.nn.functional.cross_entropy(out.logits.float(), b["answers"][i])
        penalty, terms = r.constraints.loss(out, b["padding_mask"][i], r.model)
        solo = solo_ce + penalty
        solo.backward()
        # Same terms summed in another order (batched matmuls): bounded by the reductions of the forward pass.
        n = 4 * b["tokens"].shape[-1] + TINY["model"]["d_ff"]
        assert loss[i].item() == pytest.approx(solo.item(), abs=tol(n, 10 * abs(solo.item())))
        assert raw[arm][i].item() == pytest.approx(terms[arm], abs=tol(n, 10 * max(1.0, abs(terms[arm]))))
        for name, p in r.model.named_parameters():
            g_solo, g_stack = p.grad, st.params[name].grad[i]
            if g_solo is None:
                assert g_stack.abs().max() == 0
                continue
            scale = max(g_solo.abs().max().item(), 1e-3)
            assert (g_stack - g_solo).abs().max().item() <= tol(10 * n, 100 * scale), name


def test_a_run_in_a_stack_of_8_matches_it_alone_per_step_for_200_steps(tmp_path):
    # Per-run seeds, learning rates and constraint weights, 200 steps. Learning rates up to 1.35e-3: at 1e-3 to
    # 1.7e-3 this tiny model's dynamics amplify rounding (measured: torch's own fused and foreach AdamW, two
    # implementations of one formula, drift apart by 7.7e-5 relative by step 200, the stack by 1.6e-4; here both
    # stay below 3e-6), and the claim under test is "the same run up to rounding", not a bound on chaos.
    cfgs = [tiny(seed=s, **{"train.lr": 1e-3 * (1 + 0.05 * s), "train.steps": 200, "constraints.attention_entropy": 0.1 * (1 + s % 3)})
            for s in range(8)]
    solo_losses = []
    for r in _prepared(cfgs, tmp_path / "solo"):
        r.model.train()
        steps = []
        for _ in range(200):
            assert r.step()
            steps.append(r.last["loss"].item())
        solo_losses.append(steps)
    st = _Stack(_prepared(cfgs, tmp_path / "stack"))
    stacked = []
    for _ in range(200):
        st.step()
        stacked.append(st.last["loss"])
    solo_t, stacked_t = torch.tensor(solo_losses), torch.stack(stacked).T  # (8, 200)
    rel = ((stacked_t - solo_t).abs() / solo_t.abs()).max()
    assert rel <= 1e-4, rel


def test_routed_heads_stack_without_a_vmap_fallback_and_match_their_solo_runs(tmp_path):
    # The router's top-k mask once used an in-place scalar scatter, which vmap runs as a per-run loop with a
    # UserWarning that reached the rendered report. Stacked, the step must need no fallback and stay the run.
    import warnings

    cfgs = [tiny(seed=s, **{"model.routed_top_k": 1, "model.shared_heads": 0}) for s in range(3)]
    assert stack_key(cfgs[0]) is not None
    solo = []
    for r in _prepared(cfgs, tmp_path / "solo"):
        r.model.train()
        assert r.step()
        solo.append(r.last["loss"].item())
    st = _Stack(_prepared(cfgs, tmp_path / "stack"))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*batching rule.*")
        st.step()
    assert torch.allclose(st.last["loss"], torch.tensor(solo), rtol=1e-5)


@pytest.mark.parametrize("variant", ["infonce", "club"])
def test_stacked_mi_estimators_train_per_run_like_the_solo_alternation(tmp_path, variant):
    # The estimator's own step joins the model's backward in a stack; alone it is a second backward after the
    # model's step. Same gradients, so the same losses step after step (the loss reads the critic).
    cfgs = [tiny(seed=s, **{"constraints.mutual_information": w, "constraints.mi_variant": variant})
            for s, w in [(0, 0.1), (1, 0.3), (2, 1.0)]]
    solo = []
    for r in _prepared(cfgs, tmp_path / "solo"):
        r.model.train()
        solo.append([(r.step(), r.last["loss"].item())[1] for _ in range(40)])
    st = _Stack(_prepared(cfgs, tmp_path / "stack"))
    stacked = []
    for _ in range(40):
        st.step()
        stacked.append(st.last["loss"])
    solo_t, stacked_t = torch.tensor(solo), torch.stack(stacked).T
    assert ((stacked_t - solo_t).abs() / solo_t.abs()).max() <= 1e-4
    st.write_back(1)  # the estimator's weights and Adam state come back into run 1's own state, as alone
    r_solo_state = st.runs[1].constraints.state_dict()
    assert r_solo_state["estimator_optimizer"]["state"][0]["step"].item() == 40


def _grid(cfgs, cache, **kw):
    return run_grid(cfgs, cache, n_jobs=1, progress=False, **kw)


def test_stacked_and_solo_grids_agree_on_8_seeds_and_repeat_bit_identically(tmp_path):
    cfgs = [tiny(seed=s, **{"train.steps": 120, "train.eval_every": 40}) for s in range(8)]
    solo, _ = _grid(cfgs, tmp_path / "solo", stacked=False)
    started = time.perf_counter()
    stacked, hist = _grid(cfgs, tmp_path / "stacked")  # the default
    elapsed = time.perf_counter() - started
    # Each run's wall time is its share of the stack's, so they add up to no more than the grid took.
    assert (stacked["wall_time"] > 0).all() and stacked["wall_time"].sum() <= elapsed
    again, hist2 = _grid(cfgs, tmp_path / "again", stacked=True)
    assert (stacked["status"] == "finished").all()
    info = json.loads((tmp_path / "stacked" / stacked.run_id[0] / "result.json").read_text())["info"]
    assert info["stack"]["runs"] == 8 and sorted(info["stack"]["run_ids"]) == sorted(stacked.run_id)
    cols = ["test_acc", "test_ce", "val_acc", "train_loss"]
    pd.testing.assert_frame_equal(stacked[cols], again[cols])  # same stacking, same threads: bit-identical
    pd.testing.assert_frame_equal(hist, hist2)
    for r in stacked.run_id:
        a = json.loads((tmp_path / "stacked" / r / "result.json").read_text())["model_sha256"]
        assert a == json.loads((tmp_path / "again" / r / "result.json").read_text())["model_sha256"]
    (m_solo, lo_solo, hi_solo), (m_st, lo_st, hi_st) = mean_ci(solo["test_acc"]), mean_ci(stacked["test_acc"])
    assert lo_solo <= m_st <= hi_solo and lo_st <= m_solo <= hi_st
    # each run loads like a solo one
    res = T._load_finished(cfgs[0], stacked.run_id[0], tmp_path / "stacked" / stacked.run_id[0])
    assert res.load_model().cfg.d_model == 16


def test_a_killed_stack_resumes_every_run_to_the_same_numbers(tmp_path, monkeypatch):
    cfgs = [tiny(seed=s, **{"constraints.head_usage": 0.1 * (s + 1)}) for s in range(3)]
    full, full_hist = _grid(cfgs, tmp_path / "full")
    real = _Stack.evaluate
    calls = {"n": 0}

    def killed_after_first_checkpoint(self, share):
        real(self, share)
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("killed")

    monkeypatch.setattr(_Stack, "evaluate", killed_after_first_checkpoint)
    broken, _ = _grid(cfgs, tmp_path / "cut", on_error="record")
    assert (broken["status"] == "failed").all()
    for r in broken.run_id:
        assert torch.load(tmp_path / "cut" / r / "checkpoint.pt", weights_only=False)["step"] == 20
    monkeypatch.setattr(_Stack, "evaluate", real)
    resumed, resumed_hist = _grid(cfgs, tmp_path / "cut")
    cols = ["test_acc", "test_ce", "val_acc", "train_loss", "steps_done"]
    pd.testing.assert_frame_equal(full[cols], resumed[cols])
    pd.testing.assert_frame_equal(full_hist, resumed_hist)
    for r in resumed.run_id:
        info = json.loads((tmp_path / "cut" / r / "result.json").read_text())["info"]
        assert info["resumed_from_step"] == 20


def test_a_diverging_run_is_frozen_and_recorded_while_the_others_go_on(tmp_path):
    good = [tiny(seed=s) for s in range(3)]
    bad = tiny(seed=1, **{"train.lr": 1e30})  # same seed as good[1]: same batches, so same padding in the stack
    ref, ref_hist = _grid(good, tmp_path / "ref")
    mixed, mixed_hist = _grid([good[0], bad, good[2]], tmp_path / "mixed")
    assert mixed["status"].tolist() == ["finished", "diverged", "finished"]
    info = json.loads((tmp_path / "mixed" / mixed.run_id[1] / "result.json").read_text())["info"]
    assert info["stack"]["runs"] == 3 and info["diverged_at_step"] >= 0
    assert math.isnan(mixed.loc[1, "test_acc"]) and mixed.loc[1, "steps_done"] == info["diverged_at_step"]
    cols = ["test_acc", "test_ce", "val_acc", "train_loss"]
    # The other runs' numbers do not depend on the diverged one: each run's slice of a batched op is its own.
    pd.testing.assert_frame_equal(ref.loc[[0, 2], cols], mixed.loc[[0, 2], cols])


def test_stacking_can_be_turned_off(tmp_path, monkeypatch):
    cfgs = [tiny(seed=s, **{"train.steps": 10}) for s in range(2)]
    monkeypatch.setenv("DISENTANGLE_STACKED", "0")
    runs, _ = _grid(cfgs, tmp_path)
    for r in runs.run_id:
        assert "stack" not in json.loads((tmp_path / r / "result.json").read_text())["info"]
    monkeypatch.setenv("DISENTANGLE_STACKED", "maybe")
    with pytest.raises(T.ConfigError, match="DISENTANGLE_STACKED='maybe'"):
        _grid([tiny(seed=5)], tmp_path)
