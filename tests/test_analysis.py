"""Interpretability metrics (disentangle.analysis): known values on hand-built tensors and frames, and the
model-level functions on a tiny random encoder (no training needed, except one end-to-end run)."""

import math
import random

import numpy as np
import pandas as pd
import pytest
import torch
from numerics import EPS64, tol
from test_constraints import SMALL, model_batch  # noqa: F401 (a fixture)

from disentangle import analysis as A
from disentangle import stats
from disentangle.config import PROCEDURAL_TASKS, DataConfig, RunConfig, TrainConfig
from disentangle.constraints import attention_entropy, head_usage_entropy
from disentangle.data import Story
from disentangle.model import Encoder, ModelConfig
from disentangle.data.procedural import ANIMALS, NUMBERS, OBJECTS, PLACES, PRONOUN, generate, make_story
from disentangle.train import evaluate, run

TINY_DATA = DataConfig(tasks=PROCEDURAL_TASKS, n_train=64, n_val=16, n_test=32, n_ood=8)


@pytest.fixture(scope="module")
def data():
    return generate(TINY_DATA)


@pytest.fixture(scope="module")
def split(data):
    return data.splits["test"]


def tiny_model(data, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=len(data.vocab), n_classes=len(data.answers), d_model=16, n_heads=4, d_ff=32, **kw)
    return Encoder(cfg).eval()


@pytest.fixture(scope="module")
def model(data):
    return tiny_model(data)


def masks(T, n_real, support=(), question=(), sink=()):
    """(1, T) bool masks: padding after n_real, and the given positions."""
    pad = torch.zeros(1, T, dtype=torch.bool)
    pad[0, n_real:] = True

    def mk(pos):
        m = torch.zeros(1, T, dtype=torch.bool)
        m[0, list(pos)] = True
        return m

    return pad, mk(support), mk(question), mk(sink)


def uniform_attn(H, T, n_real):
    a = torch.zeros(1, H, T, T)
    a[..., :n_real] = 1.0 / n_real
    return a


# --------------------------------------------------------------------------------- tensor-level metrics


def test_cls_mass_all_on_supporting_tokens():
    T, n = 10, 8
    pad, sup, q, sink = masks(T, n, support=(2, 3, 4), question=(6,), sink=(0, 5, 7))
    a = uniform_attn(2, T, n)
    a[0, :, 0] = 0.0
    a[0, :, 0, [2, 3, 4]] = torch.tensor([0.5, 0.3, 0.2])
    m = A.attention_metrics_from_tensors(a, pad, sup, q, sink, k=3)
    assert set(m) == set(A.ATTENTION_METRICS)
    assert all(v.shape == (1, 2) for v in m.values())
    torch.testing.assert_close(m["support_mass_cls"], torch.ones(1, 2))
    torch.testing.assert_close(m["topk_precision"], torch.ones(1, 2))
    torch.testing.assert_close(m["sink_mass"], torch.zeros(1, 2))
    torch.testing.assert_close(m["support_share"], torch.full((1, 2), 3 / 8))
    torch.testing.assert_close(m["support_excess_cls"], torch.full((1, 2), 5 / 8))
    expected_cls_entropy = -(0.5 * math.log(0.5) + 0.3 * math.log(0.3) + 0.2 * math.log(0.2)) / math.log(8)
    torch.testing.assert_close(m["entropy_cls"], torch.full((1, 2), expected_cls_entropy))
    # Other queries are uniform (entropy 1): the all-query mean mixes 7 ones with the CLS row.
    torch.testing.assert_close(m["entropy"], torch.full((1, 2), (7 + expected_cls_entropy) / 8))
    # The question token (6) attends uniformly: its support mass is the support share.
    torch.testing.assert_close(m["support_mass_question"], torch.full((1, 2), 3 / 8))


def test_uniform_attention_gives_chance_levels_and_entropy_one():
    T, n = 12, 9
    pad, sup, q, sink = masks(T, n, support=(1, 2), question=(6, 7), sink=(0, 3, 5, 8))
    m = A.attention_metrics_from_tensors(uniform_attn(3, T, n), pad, sup, q, sink)
    torch.testing.assert_close(m["entropy"], torch.ones(1, 3))
    torch.testing.assert_close(m["entropy_cls"], torch.ones(1, 3))
    torch.testing.assert_close(m["support_mass_cls"], m["support_share"])
    torch.testing.assert_close(m["support_mass_question"], m["support_share"])
    torch.testing.assert_close(m["support_excess_cls"], torch.zeros(1, 3))
    torch.testing.assert_close(m["sink_mass"], torch.full((1, 3), 4 / 9))
    torch.testing.assert_close(m["sink_share"], torch.full((1, 3), 4 / 9))


def test_one_hot_on_a_sink_and_topk_capped_by_real_keys():
    T = 6
    # Example 0: 6 real tokens, CLS looks only at SEP (position 5). Example 1: 2 real tokens.
    pad = torch.tensor([[False] * 6, [False, False] + [True] * 4])
    sup = torch.tensor([[False, True, True, False, False, False], [False, True] + [False] * 4])
    q = torch.zeros(2, T, dtype=torch.bool)
    sink = torch.tensor([[True, False, False, False, False, True], [True] + [False] * 5])
    a = torch.zeros(2, 1, T, T)
    a[0, 0, :, 5] = 1.0
    a[1, 0, :2, 1] = 1.0
    a[1, 0, 2:] = 0.123  # padded query rows: garbage
    m = A.attention_metrics_from_tensors(a, pad, sup, q, sink, k=5)
    torch.testing.assert_close(m["entropy"], torch.zeros(2, 1))
    torch.testing.assert_close(m["sink_mass"], torch.tensor([[1.0], [0.0]]))
    torch.testing.assert_close(m["support_mass_cls"], torch.tensor([[0.0], [1.0]]))
    # Example 1: k = 5 capped to its 2 real keys, one of them supporting -> 1/2 (padding never counts).
    assert m["topk_precision"][1, 0].item() == pytest.approx(0.5)
    assert math.isnan(m["support_mass_question"][0, 0].item())  # no question tokens


def test_topk_precision_counts_supporting_keys_among_the_k_largest():
    T = 6
    pad, sup, q, sink = masks(T, T, support=(1, 3))
    a = uniform_attn(1, T, T)
    a[0, 0, 0] = torch.tensor([0.05, 0.3, 0.1, 0.25, 0.2, 0.1])
    prec = lambda k: A.attention_metrics_from_tensors(a, pad, sup, q, sink, k=k)["topk_precision"].item()  # noqa: E731
    assert prec(1) == pytest.approx(1.0)  # 0.3 (supporting)
    assert prec(2) == pytest.approx(1.0)  # + 0.25 (supporting)
    assert prec(3) == pytest.approx(2 / 3)  # + 0.2
    assert prec(10) == pytest.approx(2 / 6)  # k capped at the 6 real keys


def test_values_at_padding_are_ignored():
    T, n = 8, 5
    pad, sup, q, sink = masks(T, n, support=(1, 2), question=(3,), sink=(0, 4))
    torch.manual_seed(1)
    a = torch.rand(2, 2, T, T)
    a[..., n:] = 0.0
    a = a / a.sum(-1, keepdim=True)
    pad2, sup2, q2, sink2 = (x.expand(2, T) for x in (pad, sup, q, sink))
    clean = A.attention_metrics_from_tensors(a, pad2, sup2, q2, sink2)
    dirty = a.clone()
    dirty[:, :, n:, :] = 7.0  # padded queries
    out = A.attention_metrics_from_tensors(dirty, pad2, sup2, q2, sink2)
    for name in A.ATTENTION_METRICS:
        torch.testing.assert_close(out[name], clean[name], equal_nan=True)


def test_bad_tensor_shapes_are_named():
    pad, sup, q, sink = masks(5, 5)
    with pytest.raises(ValueError, match="support_mask"):
        A.attention_metrics_from_tensors(uniform_attn(1, 5, 5), pad, sup[:, :4], q, sink)
    with pytest.raises(ValueError, match="attn"):
        A.attention_metrics_from_tensors(torch.zeros(1, 5, 5), pad, sup, q, sink)


# ------------------------------------------------------------------------------------- model-level metrics


def test_head_attention_metrics_frame(model, split, data):
    met = A.head_attention_metrics(model, split, data)
    assert set(met["layer"]) == {1}  # default: the global layers only (local_layers=1)
    assert len(met) == 4 * (len(PROCEDURAL_TASKS) + 1)
    overall = met[met["task"] == "all"]
    assert (overall["n"] == len(split)).all()
    assert (met.loc[met["task"] != "all", "n"] == 32).all()
    for name in A.ATTENTION_METRICS:
        assert {f"{name}_ci_low", f"{name}_ci_high"} <= set(met.columns)
        assert ((overall[f"{name}_ci_low"] <= overall[name]) & (overall[name] <= overall[f"{name}_ci_high"])).all()
    # The intervals are stats.mean_ci over the per-example values.
    ex = A.attention_examples(model, split, data)
    assert len(ex) == len(split) * 4
    vals = ex[(ex["head"] == 2) & (ex["task"] == "counting")]["support_mass_cls"]
    row = met[(met["head"] == 2) & (met["task"] == "counting")].iloc[0]
    np.testing.assert_allclose(stats.mean_ci(vals), [row["support_mass_cls"], row["support_mass_cls_ci_low"],
                                                     row["support_mass_cls_ci_high"]], rtol=1e-9)  # fmt: skip
    both = A.head_attention_metrics(model, split, data.vocab, layers=[0, 1])
    assert set(both["layer"]) == {0, 1}
    with pytest.raises(ValueError, match="layers"):
        A.head_attention_metrics(model, split, data, layers=[2])


def test_entropy_agrees_with_the_constraint(model, split, data):
    one = split.subset(torch.tensor([5]))
    met = A.head_attention_metrics(model, one, data)
    b = one.batch(slice(0, 1))
    out = model(b["tokens"], b["padding_mask"], capture="attn", segments=b["segments"])
    loss = attention_entropy([out.attn[1]], b["padding_mask"]).loss.item()
    # Two code paths over one story: per query a sum over T keys, then means over T queries and H heads.
    T, H = out.attn[1].shape[-1], out.attn[1].shape[1]
    assert met.loc[met["task"] == "all", "entropy"].mean() == pytest.approx(loss, abs=tol(T + T + H))


def test_attention_similarity_known_values():
    T = 4
    pad = torch.zeros(1, T, dtype=torch.bool)
    a = torch.zeros(1, 3, T, T)
    a[0, 0, :, 0] = 1.0  # head 0 and 1 identical, head 2 disjoint from both
    a[0, 1, :, 0] = 1.0
    a[0, 2, :, 1:] = 1 / 3
    s, c = A.attention_similarity_from_tensors(a, pad)
    sim = s / c
    expected = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(sim, expected, atol=tol(T, eps=EPS64), rtol=0)  # float64, cosines over T keys
    assert (sim.diagonal() == 1).all() and (sim == sim.T).all()  # exact, by construction
    s, c = A.attention_similarity_from_tensors(a, pad, queries="cls")
    assert c.item() == 1


def test_head_similarity_matrices(model, split):
    for kind in ("attention", "cka"):
        sims = A.head_similarity(model, split, kind=kind)
        assert set(sims) == {1}
        S = sims[1]
        assert S.shape == (4, 4)
        # By definition, so by construction, on any CPU: exactly symmetric, exactly 1 on the diagonal.
        assert (S == S.T).all() and (np.diag(S) == 1.0).all(), kind
        # Attention cosines of non-negative rows are sums of non-negative terms: never below 0. Above 1
        # only by rounding of a float64 cosine over T keys, or a float64 CKA over N examples and d dims.
        bound = tol(len(split) * 8 + 64, eps=EPS64)
        assert (S >= 0).all() and (S <= 1 + bound).all(), kind


def test_linear_cka_is_rotation_invariant():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 4, generator=g)
    rot, _ = torch.linalg.qr(torch.randn(4, 4, generator=g))
    reps = torch.stack([x, 3 * x @ rot, torch.randn(500, 4, generator=g)], 1)  # (N, 3 heads, 4)
    cka = A.linear_cka(reps)
    # CKA is computed in float64, but 3·x·R is rounded to float32 once per entry of a 4-term product.
    assert cka[0, 1].item() == pytest.approx(1.0, abs=tol(4 + 4))
    assert cka[0, 2].item() < 0.05


# ------------------------------------------------------------------------------------------ importance


def test_head_importance_is_the_exact_accuracy_drop(data, split):
    model = tiny_model(data, seed=3)
    with torch.no_grad():  # make head (1, 2) dominate the readout, so zeroing it changes predictions
        model.blocks[1].attn.W_O[2] *= 300.0
    imp = A.head_importance(model, split, data.tasks)
    base = evaluate(model, split, data.tasks)
    for head in range(4):
        with model.ablate_heads([(1, head)]):
            ablated = evaluate(model, split, data.tasks)
        rows = imp[imp["head"] == head].set_index("task")
        assert rows.loc["all", "importance"] == pytest.approx(base["acc"] - ablated["acc"], abs=1e-9)
        assert rows.loc["all", "base_acc"] == pytest.approx(base["acc"])
        for task in data.tasks:
            assert rows.loc[task, "importance"] == pytest.approx(base[f"acc/{task}"] - ablated[f"acc/{task}"], abs=1e-9)
            assert rows.loc[task, "ablated_acc"] == pytest.approx(ablated[f"acc/{task}"])
    strong = imp[(imp["head"] == 2) & (imp["task"] == "all")].iloc[0]
    assert strong["ce_increase"] != 0.0
    assert (imp.loc[imp["head"] == 2, "importance"] != 0).any()  # the check above is not vacuous
    assert {"importance_mean", "importance_max", "max_task", "context_dependent"} <= set(imp.columns)


def test_context_dependence_flags():
    tasks = [f"t{i}" for i in range(6)]
    drops = {0: [0.0, 0.0, 0.0, 0.0, 0.0, 0.06], 1: [0.1] * 6, 2: [0.0] * 6, 3: [-0.01] * 5 + [0.08]}
    frame = pd.DataFrame([{"layer": 1, "head": h, "task": t, "importance": v}
                          for h, vs in drops.items() for t, v in zip(tasks, vs)]
                         + [{"layer": 1, "head": 0, "task": "all", "importance": 0.5}])  # ignored
    cd = A.context_dependence(frame, small=0.01, large=0.05).set_index("head")
    assert cd.loc[0, "importance_mean"] == pytest.approx(0.01)
    assert cd.loc[0, "importance_max"] == pytest.approx(0.06)
    assert cd.loc[0, "max_task"] == "t5"
    assert list(cd["context_dependent"]) == [False, False, False, True]  # head 0's mean is not < 0.01
    assert bool(A.context_dependence(frame, small=0.011, large=0.05).set_index("head").loc[0, "context_dependent"])


def test_head_usage_shares_match_the_constraint(model, split):
    usage = A.head_usage(model, split)
    overall = usage[usage["task"] == "all"]
    assert overall["usage_share"].sum() == pytest.approx(1.0)
    for _, g in usage.groupby("task"):
        assert g["usage_share"].sum() == pytest.approx(1.0)
        assert g["usage_share_cls"].sum() == pytest.approx(1.0)
    b = split.batch(slice(0, len(split)))
    out = model(b["tokens"], b["padding_mask"], capture="head_contrib", segments=b["segments"])
    p = overall["usage_share"].to_numpy()
    assert -(p * np.log(p)).sum() / math.log(4) == pytest.approx(
        head_usage_entropy([out.head_contrib[1]], b["padding_mask"]).loss.item(), abs=1e-5)
    per_task = usage[usage["task"] != "all"].groupby("task")["usage"].sum().sum()
    assert per_task == pytest.approx(overall["usage"].sum(), rel=1e-9)


# --------------------------------------------------------------------------------------------- factors


def test_story_factors_on_each_question_form():
    def story(task, question, answer="kitchen"):
        return Story((("mary", "went", "to", "the", "kitchen", "."),), tuple(question.split()), answer, task, (0,))

    stories = [
        story("where_person", "where is mary ?"),
        story("where_object", "where is the football ?"),
        story("coreference", "where is daniel ?"),
        story("counting", "how many objects is john carrying ?", "two"),
        story("majority", "are there more boys or girls in the garden ?", "boys"),
        story("deduction", "what is gertrude afraid of ?", "mice"),
        story("qa3", "where was the apple before the bathroom ?"),
        story("qa5", "who gave the zorblax to bill ?", "fred"),
        story("qa99", "what ?"),
    ]
    f = A.story_factors(stories)
    assert list(f["queried"][:8]) == ["mary", "football", "daniel", "john", "garden", "gertrude", "apple", "bill"]
    assert list(f["queried_kind"][:8]) == ["person", "object", "person", "person", "place", "animal", "object", "person"]
    assert pd.isna(f.loc[8, "queried"]) and pd.isna(f.loc[8, "queried_kind"])  # nothing to ask about
    assert f.loc[3, "count"] == 2.0
    assert f["count"].isna().sum() == len(stories) - 1
    assert list(f["answer"])[:2] == ["kitchen", "kitchen"]
    assert (f["n_sentences"] == 1).all() and (f["n_supporting"] == 1).all()
    assert A.queried_entity(("where", "is", "the", "zorblax", "?")) == ("zorblax", "other")


def test_story_factors_on_generated_stories():
    cfg = DataConfig(tasks=PROCEDURAL_TASKS)
    kinds = {"where_person": PRONOUN, "coreference": PRONOUN, "counting": PRONOUN, "where_object": OBJECTS,
             "majority": PLACES, "deduction": ANIMALS}  # fmt: skip
    rng = random.Random(0)
    for task in PROCEDURAL_TASKS:
        stories = [make_story(task, rng, cfg) for _ in range(5)]
        f = A.story_factors(stories)
        for s, (_, row) in zip(stories, f.iterrows()):
            assert row["queried"] in s.question and row["queried"] in kinds[task]
            assert row["n_sentences"] == len(s.sentences)
            if task == "counting":
                assert row["count"] == NUMBERS.index(s.answer)
            else:
                assert math.isnan(row["count"])


# ---------------------------------------------------------------------------------------------- probes


def test_probes_find_an_encoded_factor_and_not_a_random_one():
    rng = np.random.default_rng(0)
    N, d = 600, 6
    labels = rng.integers(0, 4, N)
    encoded = np.eye(4)[labels] @ rng.normal(size=(4, d)) + 0.01 * rng.normal(size=(N, d))
    noise = rng.normal(size=(N, d))
    reps = np.stack([encoded, noise], 1)
    factors = pd.DataFrame({"f": [f"c{i}" for i in labels], "sparse": [None] * (N - 30) + ["a", "b"] * 15})
    p = A.probe_representations(reps, [(1, 0), (1, 1)], factors, ["f", "sparse"], cv=3, seed=0)
    f = p[p["factor"] == "f"].set_index("head")
    assert f.loc[0, "acc"] > 0.98
    assert f.loc[1, "acc"] == pytest.approx(f.loc[1, "majority"], abs=0.08)
    assert f.loc[0, "majority"] == pytest.approx(np.bincount(labels).max() / N)
    assert f.loc[0, "gain"] == pytest.approx(f.loc[0, "acc"] - f.loc[0, "majority"])
    assert f.loc[0, "norm_gain"] > 0.97
    sparse = p[p["factor"] == "sparse"]
    assert (sparse["n"] == 30).all() and (sparse["majority"] == 0.5).all()
    again = A.probe_representations(reps, [(1, 0), (1, 1)], factors, ["f"], cv=3, seed=0)
    pd.testing.assert_frame_equal(again, p[p["factor"] == "f"].reset_index(drop=True))
    with pytest.raises(ValueError, match="nope"):
        A.probe_representations(reps, [(1, 0), (1, 1)], factors, ["nope"])


def test_probe_heads_on_a_model(model, split):
    factors = A.story_factors(split)
    p = A.probe_heads(model, split, factors, ["answer", "task", "count"], max_examples=100)
    assert len(p) == 4 * 3
    assert set(p["layer"]) == {1}
    # count exists on the 32 counting stories only (less any count seen fewer than cv=3 times)
    count = p[p["factor"] == "count"]
    assert (count["n"] <= 32).all() and (count["n"] >= 25).all() and (count["n_classes"] >= 2).all()
    assert (p.loc[p["factor"] == "task", "n"] == 100).all()  # max_examples of the 192
    assert p["acc"].between(0, 1).all()
    reps, heads = A.pooled_head_outputs(model, split, layers=[0, 1], pool="cls")
    assert reps.shape == (len(split), 8, 4) and heads[0] == (0, 0) and heads[-1] == (1, 3)


def test_posthoc_mi_is_a_seeded_mean_over_head_pairs(model, split):
    a = A.posthoc_mi(model, split, methods=("infonce", "club"), seed=1, steps=5)
    assert set(a) == {"infonce", "club"} and all(math.isfinite(v) for v in a.values())
    assert A.posthoc_mi(model, split, methods=("club",), seed=1, steps=5)["club"] == pytest.approx(a["club"])
    with pytest.raises(ValueError, match="split"):
        A.posthoc_mi(model)


# ----------------------------------------------------------------------------------------- exclusivity


def test_exclusivity_known_values():
    diag = A.exclusivity_from_matrix(np.eye(3) * 0.4)
    assert diag["disentanglement"] == pytest.approx(1.0) and diag["completeness"] == pytest.approx(1.0)
    uniform = A.exclusivity_from_matrix(np.full((4, 3), 0.2))
    assert uniform["disentanglement"] == pytest.approx(0.0) and uniform["completeness"] == pytest.approx(0.0)
    # One head knows both factors equally (D_h = 0), the other knows nothing (weight 0); each factor lives
    # in a single head (C_f = 1).
    mixed = A.exclusivity_from_matrix(np.array([[0.3, 0.3], [0.0, 0.0]]))
    assert mixed["disentanglement"] == pytest.approx(0.0) and mixed["completeness"] == pytest.approx(1.0)
    assert np.isnan(mixed["D_h"][1])
    empty = A.exclusivity_from_matrix(np.zeros((2, 2)))
    assert math.isnan(empty["disentanglement"]) and math.isnan(empty["completeness"])
    # Two heads each with all mass on one factor, weights 0.75 / 0.25 -> D = 1; one factor split 0.5/0.5.
    r = A.exclusivity_from_matrix(np.array([[0.3, 0.0], [0.1, 0.0]]))
    assert r["disentanglement"] == pytest.approx(1.0)
    p = np.array([0.75, 0.25])
    assert r["completeness"] == pytest.approx(1 + (p * np.log(p)).sum() / math.log(2))


def test_exclusivity_from_probe_frames():
    rows = []
    for model_name, gains in {"diag": np.eye(2) * 0.5, "flat": np.full((2, 2), 0.5)}.items():
        for h in range(2):
            for f, factor in enumerate(["answer", "queried"]):
                rows.append({"model": model_name, "layer": 1, "head": h, "factor": factor, "gain": gains[h, f]})
    probes = pd.DataFrame(rows)
    by = A.exclusivity_by(probes, "model").set_index("model")
    assert by.loc["diag", "disentanglement"] == pytest.approx(1.0)
    assert by.loc["flat", "disentanglement"] == pytest.approx(0.0)
    assert by.loc["diag", "informativeness"] == pytest.approx(0.5)
    e = A.exclusivity(probes[probes["model"] == "diag"])
    assert e["n_heads"] == 2 and e["n_factors"] == 2
    assert list(e["per_head"]) == pytest.approx([1.0, 1.0])
    with pytest.raises(ValueError, match="several models"):
        A.exclusivity(probes)
    # Gains at or below min_gain count as 0: a noisy 0.01 no longer spoils the diagonal.
    noisy = probes[probes["model"] == "diag"].assign(gain=lambda d: d["gain"].replace(0.0, 0.01))
    assert A.exclusivity(noisy)["disentanglement"] < 1.0
    assert A.exclusivity(noisy, min_gain=0.02)["disentanglement"] == pytest.approx(1.0)


# ------------------------------------------------------------------------------ sparsity vs correctness


def test_sparsity_vs_correctness_monotone():
    n = 8
    entropy = np.linspace(0.9, 0.2, n)  # sparser and sparser ...
    frame = pd.DataFrame({
        "model": np.repeat(["m0", "m1"], n // 2), "constraint": np.repeat(["baseline", "attention_entropy"], n // 2),
        "layer": 1, "head": np.tile(np.arange(n // 2), 2), "task": "all",
        "entropy": entropy, "entropy_cls": entropy,
        "support_mass_cls": np.linspace(0.1, 0.8, n),  # ... and more and more correct
        "support_excess_cls": -np.linspace(0.1, 0.8, n),  # ... or less and less
    })  # fmt: skip
    other = frame.assign(task="where_person", support_mass_cls=0.0)  # other task rows are ignored
    res = A.sparsity_vs_correctness(pd.concat([frame, other]), sparsity="entropy_cls").set_index("correctness")
    assert res.loc["support_mass_cls", "rho"] == pytest.approx(1.0)
    assert res.loc["support_excess_cls", "rho"] == pytest.approx(-1.0)
    assert res.loc["support_mass_cls", "n"] == n
    lo, hi = res.loc["support_mass_cls", ["ci_low", "ci_high"]]
    assert 0.99 < lo <= hi <= 1.0  # Fisher z of rho = 1 is clipped just below 1
    assert res.loc["support_mass_cls", "verdict"] == "supported"
    assert res.loc["support_excess_cls", "verdict"] == "not supported"
    grouped = A.sparsity_vs_correctness(frame, by="constraint")
    assert set(grouped["constraint"]) == {"all", "baseline", "attention_entropy"}
    assert set(grouped["sparsity"]) == {"1 - entropy_cls", "1 - entropy"}
    assert (grouped.loc[grouped["constraint"] != "all", "n"] == 4).all()


def test_model_level_intervals_are_over_models():
    frame = pd.DataFrame({
        "model": ["a", "a", "b", "b", "c", "c"], "constraint": ["x", "x", "x", "x", "y", "y"],
        "layer": 1, "head": [0, 1] * 3, "task": "all", "entropy": [0.2, 0.4, 0.6, 0.8, 0.5, 0.5],
    })  # fmt: skip
    out = A.model_level(frame, ["entropy"], by="constraint").set_index("constraint")
    m, lo, hi = stats.mean_ci([0.3, 0.7])
    assert out.loc["x", "entropy"] == pytest.approx(m)
    assert out.loc["x", "entropy_ci_low"] == pytest.approx(lo) and out.loc["x", "entropy_ci_high"] == pytest.approx(hi)
    assert out.loc["x", "n"] == 2 and out.loc["y", "n"] == 1 and math.isnan(out.loc["y", "entropy_ci_low"])


# ---------------------------------------------------------------------------------------- report card


def test_head_report_card_end_to_end(tmp_path):
    cfg = RunConfig(model=ModelConfig(d_model=16, n_heads=4, d_ff=32),
                    data=DataConfig(tasks=("where_person", "counting"), n_train=64, n_val=16, n_test=32, n_ood=8),
                    train=TrainConfig(steps=30, eval_every=30, warmup_steps=5, device="cpu"))  # fmt: skip
    result = run(cfg, tmp_path)
    model, data = result.load_model(), result.data()
    split = data.splits["test"]
    met = A.head_attention_metrics(model, split, data)
    imp = A.head_importance(model, split, data.tasks)
    usage = A.head_usage(model, split)
    probes = A.probe_heads(model, split, A.story_factors(split), ["answer", "queried", "task"])
    card = A.head_report_card(met, imp, usage, probes)
    assert set(A.posthoc_mi(result, methods=("club",), steps=5)) == {"club"}  # a RunResult: its test split
    assert len(card) == 4 and list(card["head"]) == [0, 1, 2, 3]
    for col in ("entropy", "support_mass_cls", "sink_mass", "importance", "importance_max", "usage_share",
                "best_factor", "best_gain"):  # fmt: skip
        assert col in card.columns and card[col].notna().all()
    head1 = card.set_index("head").loc[1]
    assert head1["entropy"] == met[(met["head"] == 1) & (met["task"] == "all")]["entropy"].item()
    assert head1["best_gain"] == probes[probes["head"] == 1]["gain"].max()
    # Several models: a model column keeps their heads apart.
    tag = lambda f, name: f.assign(model=name)  # noqa: E731
    two = A.head_report_card(pd.concat([tag(met, "a"), tag(met, "b")]), pd.concat([tag(imp, "a"), tag(imp, "b")]),
                             pd.concat([tag(usage, "a"), tag(usage, "b")]), pd.concat([tag(probes, "a"), tag(probes, "b")]))  # fmt: skip
    assert len(two) == 8 and set(two["model"]) == {"a", "b"}
    with pytest.raises(ValueError, match="model"):
        A.head_report_card(tag(met, "a"), imp, usage)


# ------------------------------------------------------------------------------------------- heatmaps


def test_random_heads_is_seeded_and_in_range():
    a = A.random_heads(4, 8, 5, seed=3)
    assert a == A.random_heads(4, 8, 5, seed=3)
    assert len(set(a)) == 5 and a == sorted(a)
    assert all(0 <= layer < 4 and 0 <= h < 8 for layer, h in a)
    assert any(A.random_heads(4, 8, 5, seed=s) != a for s in range(4, 10))
    assert all(layer >= 1 for layer, _ in A.random_heads(2, 8, 8, seed=0, local_layers=1))
    assert A.random_heads(2, 8, 3, seed=0, layers=[0]) == sorted(A.random_heads(2, 8, 3, seed=0, layers=[0]))
    with pytest.raises(ValueError, match="k=9"):
        A.random_heads(2, 8, 9, seed=0, local_layers=1)


def test_attention_for_story(model, split):
    out = A.attention_for_story(model, split, 7, [(1, 0), (0, 3)])
    T = int((~split.padding_mask[7]).sum())
    assert len(out["tokens"]) == T and out["tokens"][0] == "<cls>" and out["tokens"][-1] == "<sep>"
    for mat in out["attn"].values():
        assert mat.shape == (T, T)
        np.testing.assert_allclose(mat.sum(1), 1.0, atol=tol(2 * T), rtol=0)  # softmax's sum and this one
    assert out["support_mask"].shape == (T,) and out["support_mask"].any()
    assert [t for t, q in zip(out["tokens"], out["question_mask"]) if q] == list(out["story"].question)
    assert out["sink_mask"][0] and out["sink_mask"][-1]
    assert out["correct"] == (out["predicted"] == out["answer"])
    with pytest.raises(IndexError):
        A.attention_for_story(model, split, len(split), [(1, 0)])


# ------------------------------------------------------------------- post-hoc MI estimators, known truth


def test_estimate_head_mi_gives_symmetric_matrices_with_nan_diagonal(model_batch):
    model, tokens, pad = model_batch
    out = model(tokens, pad, capture="head_out")
    for method in ("infonce", "club"):
        with torch.inference_mode():  # as an analysis might call it; the critic still trains
            mats = A.estimate_head_mi(out.head_out, pad, method=method, steps=5, seed=0, batch_size=4)
        assert len(mats) == SMALL.n_layers and mats[0].shape == (4, 4)
        assert torch.isnan(mats[0].diagonal()).all()
        off = ~torch.eye(4, dtype=torch.bool)
        assert torch.isfinite(mats[0][off]).all() and torch.equal(mats[0][off], mats[0].T[off])




def correlated_gaussians(rhos: list[float], d: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One problem per ρ: x ~ N(0, I_d), y = ρx + √(1−ρ²)·ε, so I(x; y) = −(d/2)·log(1−ρ²)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(rhos), n, d, generator=g)
    eps = torch.randn(len(rhos), n, d, generator=g)
    r = torch.tensor(rhos)[:, None, None]
    return x, r * x + (1 - r**2).sqrt() * eps


def test_mi_estimators_on_correlated_gaussians_with_known_mi():
    rhos, d = [0.3, 0.5, 0.7], 2
    true = torch.tensor([-d / 2 * math.log(1 - r * r) for r in rhos])  # 0.09, 0.29, 0.67 nats
    club_closed = torch.tensor([d * r * r / (1 - r * r) for r in rhos])  # CLUB with q = p(y|x): 0.20, 0.67, 1.92
    x, y = correlated_gaussians(rhos, d, n=8192, seed=0)
    # 300 seeded Adam steps each, batch 256 (log N = 5.5 ≫ MI), estimates on 4096 held-out samples.
    nce = A.estimate_mi(x, y, "infonce", steps=300, seed=0)
    club = A.estimate_mi(x, y, "club", steps=300, seed=0)
    # Tolerances (nats), from the spread over seeds 0-4: InfoNCE was within [-0.05, +0.01] of the truth,
    # CLUB within ±0.05 + 10% of its closed form.
    assert (nce <= true + 0.05).all(), (nce, true)
    assert (nce >= true - 0.1).all(), (nce, true)
    assert (club >= true - 0.05).all(), (club, true)
    assert ((club - club_closed).abs() <= 0.1 + 0.1 * club_closed).all(), (club, club_closed)
    assert (nce.diff() > 0).all() and (club.diff() > 0).all()  # both increase with ρ


# ------------------------------------------------------------------- routed heads and Hopfield attractors


def test_token_kinds_follow_the_lexicons(data, split):
    kinds = A.token_kinds(split, data.vocab)
    words = data.vocab.decode(split.tokens[0].tolist())
    for w, k in zip(words, kinds[0]):
        if w in PLACES:
            assert k == "place"
        elif w in ("<cls>", "<sep>"):
            assert k == "special"
    assert (kinds[split.padding_mask.numpy()] == "pad").all()


def test_routing_stats_count_the_gates(data, split):
    plain = A.routing_stats(tiny_model(data), split, data.vocab, tasks=data.tasks)
    assert (plain["frequency"] == 1).all() and np.allclose(plain["routing_entropy"], 1.0)  # every gate 1
    routed = A.routing_stats(tiny_model(data, routed_top_k=1, shared_heads=1), split, data.vocab, tasks=data.tasks)
    everything = routed[(routed["by"] == "task") & (routed["group"] == "all")].set_index(["layer", "head"])
    for layer, g in everything.groupby(level=0):
        assert g.loc[(layer, 0), "frequency"] == 1.0  # the shared head is always on
        assert g["frequency"].sum() == pytest.approx(2.0)  # + exactly one routed head per token
    sel = A.selectivity(routed, by="role")
    assert set(sel.columns) >= {"layer", "head", "selectivity", "top_group"}
    assert ((sel["selectivity"] >= 0) & (sel["selectivity"] <= 1 + 1e-12)).all()


def test_attractor_factors_are_nmi_and_purity_over_entity_tokens(data, split):
    model = tiny_model(data, hopfield_patterns=4, hopfield_beta=20.0)
    table = A.attractor_factors(model, split, data.vocab)
    assert set(table["factor"]) == {"kind", "entity", "role"}
    assert ((table["nmi"] >= 0) & (table["nmi"] <= 1 + 1e-12)).all()
    assert ((table["purity"] > 0) & (table["purity"] <= 1)).all() and (table["n_attractors"] <= 4).all()
    with pytest.raises(ValueError, match="no Hopfield memory"):
        A.attractor_factors(tiny_model(data), split, data.vocab)


def test_state_clusters_score_a_kmeans_clustering_of_the_states_at_the_same_tokens(data, split):
    model = tiny_model(data)
    table = A.state_clusters(model, split, data.vocab, n_clusters=5)
    assert set(table["factor"]) == {"kind", "entity", "role"} and (table["n_clusters"] == 5).all()
    hop = A.attractor_factors(tiny_model(data, hopfield_patterns=4, hopfield_beta=20.0), split, data.vocab)
    assert sorted(table["n_tokens"].unique()) == sorted(hop["n_tokens"].unique())  # the same entity tokens
    assert ((table["ami"] <= 1 + 1e-12) & (table["purity"] > 0) & (table["purity"] <= 1)).all()
    pd.testing.assert_frame_equal(table, A.state_clusters(model, split, data.vocab, n_clusters=5, batch_size=7))  # seeded
    one = A.state_clusters(model, split, data.vocab, n_clusters=1)  # one cluster holds nothing about any factor
    assert (one["nmi"] == 0).all() and (one["ami"] == 0).all()
    with pytest.raises(ValueError, match="n_clusters=0 must be >= 1"):
        A.state_clusters(model, split, data.vocab, n_clusters=0)


def test_factor_scores_known_values():
    one_to_one = A.factor_scores(np.array([0, 0, 1, 1]), np.array(["x", "x", "y", "y"]))
    assert one_to_one == pytest.approx({"nmi": 1.0, "ami": 1.0, "purity": 1.0})
    lumped = A.factor_scores(np.array([0, 0, 0, 0]), np.array(["x", "x", "x", "y"]))
    assert lumped == pytest.approx({"nmi": 0.0, "ami": 0.0, "purity": 0.75})
    split_ = A.factor_scores(np.array([0, 1, 2, 3]), np.array(["x", "x", "y", "y"]))
    assert split_["purity"] == 1.0 and 0 < split_["nmi"] < 1  # pure but not one-to-one
    # one cluster per token: NMI 2/3 (it grows with the number of clusters), chance-adjusted 0 or below
    assert split_["nmi"] == pytest.approx(2 / 3) and split_["ami"] <= 1e-12


def test_attention_zeros_none_for_softmax_some_for_entmax(data, split):
    soft = A.attention_zeros(tiny_model(data), split)
    assert (soft["zero_share"] == 0).all() and (soft["zero_share_cls"] == 0).all()
    model = tiny_model(data, attention="entmax15")
    with torch.no_grad():  # spread the scores so entmax has keys to set to 0
        for block in model.blocks:
            block.attn.W_Q.mul_(30.0)
            block.attn.W_K.mul_(30.0)
    sparse = A.attention_zeros(model, split)
    assert len(sparse) == len(soft) and (sparse["zero_share"] > 0).any()
    assert ((sparse["zero_share"] >= 0) & (sparse["zero_share"] < 1)).all()  # each row keeps at least one key


def test_routing_and_attractor_statistics_do_not_depend_on_the_batching(data, split):
    # batches are trimmed to their longest story; statistics over several batches equal those over one
    routed = tiny_model(data, routed_top_k=1, shared_heads=1)
    one = A.routing_stats(routed, split, data.vocab, tasks=data.tasks, batch_size=len(split))
    many = A.routing_stats(routed, split, data.vocab, tasks=data.tasks, batch_size=7)
    pd.testing.assert_frame_equal(one, many)
    hop = tiny_model(data, hopfield_patterns=4, hopfield_beta=20.0)
    pd.testing.assert_frame_equal(A.attractor_factors(hop, split, data.vocab, batch_size=len(split)),
                                  A.attractor_factors(hop, split, data.vocab, batch_size=7))
