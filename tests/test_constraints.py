"""The head constraints: known values, padding and batch-order invariance, where gradients go,
the MI estimators against correlated Gaussians of known MI, and the training object's contract."""

import math

import pytest
import torch
import torch.nn.functional as F

from disentangle.config import ConstraintConfig
from disentangle.constraints import (
    FORMULAS,
    MEASURE_CAPTURES,
    attention_entropy,
    head_usage_entropy,
    infonce_bound,
    infonce_mi,
    measure,
    orthogonality_attention,
    orthogonality_contributions,
    orthogonality_outputs,
    orthogonality_weights,
    pooled_heads,
    published_attention_entropy,
    published_head_usage,
    published_infonce,
    published_orthogonality,
)
from disentangle.model import Encoder, ModelConfig
from disentangle.objective import Constraints
from numerics import tol
from torch import Tensor


def close(actual: Tensor, expected: Tensor, atol: float) -> None:
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)


@pytest.fixture(autouse=True)
def _one_thread():
    """These tensors are tiny: one intra-op thread is faster, and immune to a busy shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


B, H, T, DH, D = 6, 4, 9, 4, 16
LENGTHS = torch.tensor([9, 7, 5, 9, 1, 3])  # real tokens per sample; one sample has a single token
# Longest chain of accumulations in one of these losses: a cosine or entropy over at most D features or T
# keys, a mean over the H·(H−1)/2 pairs or H heads, a mean over the B·T tokens; every term is ≤ 2 (a
# cosine over the InfoNCE temperature 0.5; the others are ≤ 1). Known values and invariances are compared
# within that many roundings (tests/numerics.py), on any CPU.
KNOWN = tol(D + T + H * H + B * T, magnitude=2.0)


def padding(lengths: torch.Tensor = LENGTHS, t: int = T) -> torch.Tensor:
    return torch.arange(t)[None, :] >= lengths[:, None]  # (B, T), True on padding


def attention_from_scores(scores: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
    """Valid attention (B, H, T, T) like the model's: no real query attends to a padding key."""
    return scores.masked_fill(pad[:, None, None, :], float("-inf")).softmax(-1)


def random_inputs() -> dict:
    """Per-layer internals of a 2-layer model, padded as LENGTHS, away from every loss's floor."""
    g = torch.Generator().manual_seed(0)
    pad = padding()
    shared = 2 * torch.randn(B, 1, 1, DH, generator=g)  # a per-sample component all heads share: MI > 0
    head_scale = torch.tensor([0.5, 1.0, 2.0, 4.0])[None, :, None, None]  # unequal head usage
    return {
        "pad": pad,
        "head_out": [torch.randn(B, H, T, DH, generator=g) + shared for _ in range(2)],
        "head_contrib": [torch.randn(B, H, T, D, generator=g) * head_scale for _ in range(2)],
        "attn": [attention_from_scores(2 * torch.randn(B, H, T, T, generator=g), pad) for _ in range(2)],
    }


# Every function under a common signature: inputs -> ConstraintResult.
FUNCTIONS = {
    "orthogonality_outputs": lambda x: orthogonality_outputs(x["head_out"], x["pad"]),
    "orthogonality_attention": lambda x: orthogonality_attention(x["attn"], x["pad"]),
    "infonce": lambda x: infonce_mi(x["head_out"], x["pad"], temperature=0.5),
    "attention_entropy": lambda x: attention_entropy(x["attn"], x["pad"]),
    "head_usage": lambda x: head_usage_entropy(x["head_contrib"], x["pad"]),
}
TOKEN_LEVEL = {"orthogonality_outputs", "orthogonality_attention", "attention_entropy"}


# ------------------------------------------------------------------------------------- known values


def test_outputs_orthogonal_heads_give_0_identical_heads_give_1():
    pad = padding()
    scale = torch.rand(B, H, T, 1) + 0.5
    basis = torch.eye(DH)[:H]  # head h writes along e_h only
    orthogonal = scale * basis[None, :, None, :]
    assert orthogonality_outputs([orthogonal], pad).loss.item() == pytest.approx(0.0, abs=KNOWN)
    same = torch.randn(B, 1, T, DH).expand(B, H, T, DH) * scale
    assert orthogonality_outputs([same], pad).loss.item() == pytest.approx(1.0, abs=KNOWN)
    # An intermediate value: two heads at 60 degrees -> cos² = 0.25.
    at_60 = torch.tensor([[1.0, 0.0], [0.5, math.sqrt(3) / 2]])[None, :, None, :].expand(B, 2, T, 2)
    assert orthogonality_outputs([at_60], pad).loss.item() == pytest.approx(0.25, abs=KNOWN)


def random_rotation(n: int, g: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g))
    return q * torch.sign(torch.diagonal(r))


def test_weights_orthogonal_subspaces_give_0_identical_blocks_give_1_and_rotations_change_nothing():
    g = torch.Generator().manual_seed(0)
    d, dh = D, DH
    # Head h reads coordinates [h·dh, (h+1)·dh) of the residual stream, through an arbitrary full-rank block.
    disjoint = torch.zeros(H, d, dh)
    for h in range(H):
        disjoint[h, h * dh : (h + 1) * dh] = torch.randn(dh, dh, generator=g)
    assert orthogonality_weights([disjoint]).loss.item() == pytest.approx(0.0, abs=KNOWN)
    # ... still 0 after rotating the whole residual stream (the subspaces stay orthogonal).
    assert orthogonality_weights([random_rotation(d, g) @ disjoint]).loss.item() == pytest.approx(0.0, abs=KNOWN)
    same = torch.randn(1, d, dh, generator=g).expand(H, d, dh)
    assert orthogonality_weights([same]).loss.item() == pytest.approx(1.0, abs=KNOWN)
    # W_i -> W_i R_i (each head rotated differently) and rescaling leave G unchanged, so identical
    # subspaces still give 1 even though the flattened blocks are now far from parallel.
    rotated = torch.stack([3.0 * same[h] @ random_rotation(dh, g) for h in range(H)])
    # ‖W_iᵀW_j‖_F² of 3·W·R: products over d and d_head, squared, summed over d_head² entries.
    assert orthogonality_weights([rotated]).loss.item() == pytest.approx(1.0, abs=tol(2 * (D + DH) + DH * DH + H * H))
    random_blocks = torch.randn(H, d, dh, generator=g)
    turned = torch.stack([random_blocks[h] @ random_rotation(dh, g) for h in range(H)])
    expected = orthogonality_weights([random_blocks]).loss.item()
    assert orthogonality_weights([turned]).loss.item() == pytest.approx(expected, abs=tol(2 * (D + DH) + DH * DH + H * H))


def test_weights_random_blocks_sit_near_the_documented_baseline():
    # The docstring's claim: i.i.d. Gaussian blocks give G² ≈ d_head / (d_model + d_head) (0.2 at 64/16).
    blocks = list(torch.randn(40, 4, 64, 16))
    assert orthogonality_weights(blocks).loss.item() == pytest.approx(16 / 80, abs=0.02)


def test_contribution_orthogonality_ignores_a_rotation_of_a_head_that_output_orthogonality_rewards():
    # Re-basing head h (W_V[h] → W_V[h] R, W_O[h] → Rᵀ W_O[h]) changes z_h to z_h R and leaves c_h = z_h W_O[h],
    # and so the model, unchanged. Rotating one head of two identical ones lowers output orthogonality, not this.
    model = Encoder(SMALL)
    tokens = torch.randint(0, 20, (8, 10))
    pad = padding(torch.tensor([10, 8, 6, 10, 4, 9, 7, 10]), 10)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        attn = model.blocks[1].attn
        attn.W_V[1].copy_(attn.W_V[0])
        attn.W_O[1].copy_(attn.W_O[0])  # heads 0 and 1 identical: both penalties at their maximum for the pair
        capture = ("head_out", "head_contrib")
        before = model(tokens, pad, capture=capture)
        R = random_rotation(SMALL.d_head, g)
        attn.W_V[1].copy_(attn.W_V[1] @ R)
        attn.W_O[1].copy_(R.T @ attn.W_O[1])
        after = model(tokens, pad, capture=capture)
    close(after.logits, before.logits, tol(4 * SMALL.d_model))  # the same function, up to rounding
    outputs = [orthogonality_outputs(o.head_out[1:], pad).loss for o in (before, after)]
    contributions = [orthogonality_contributions(o.head_contrib[1:], pad).loss for o in (before, after)]
    assert outputs[1] < outputs[0] - 0.05  # the rotation "disentangles" the outputs
    close(contributions[1], contributions[0], KNOWN)  # ... but not what the heads write


def test_attention_disjoint_heads_give_0_identical_heads_give_1_however_diffuse():
    pad = torch.zeros(1, H, dtype=torch.bool)  # T = H real tokens
    one_hot = torch.eye(H)[None, :, None, :].expand(1, H, H, H)  # head h always attends to key h
    assert orthogonality_attention([one_hot], pad).loss.item() == pytest.approx(0.0, abs=KNOWN)
    uniform = torch.full((1, H, H, H), 1.0 / H)
    assert orthogonality_attention([uniform], pad).loss.item() == pytest.approx(1.0, abs=KNOWN)
    sharp_same = torch.eye(H)[None, None].expand(1, H, H, H)  # all heads: query q attends to key q
    assert orthogonality_attention([sharp_same], pad).loss.item() == pytest.approx(1.0, abs=KNOWN)


def test_attention_entropy_uniform_gives_1_one_hot_gives_0_single_key_gives_0():
    pad = padding()
    uniform = attention_from_scores(torch.zeros(B, H, T, T), pad)
    result = attention_entropy([uniform], pad)
    # Every real query scores 1, except the single-token sample's (index 4), defined as 0.
    expected = (~pad).float()
    expected[4] = 0.0
    torch.testing.assert_close(result.per_token, expected)
    n_real = int(LENGTHS.sum())
    assert result.loss.item() == pytest.approx((n_real - 1) / n_real, abs=KNOWN)
    no_single = padding(torch.full((B,), T))
    uniform_all = attention_from_scores(torch.zeros(B, H, T, T), no_single)
    assert attention_entropy([uniform_all], no_single).loss.item() == pytest.approx(1.0, abs=KNOWN)
    one_hot = attention_from_scores(torch.randn(B, H, T, T) * 1e4, pad)
    assert attention_entropy([one_hot], pad).loss.item() == pytest.approx(0.0, abs=KNOWN)


def test_head_usage_equal_gives_1_one_active_head_gives_0():
    pad = padding()
    equal = F.normalize(torch.randn(B, H, T, D), dim=-1) * 2.0  # every head: norm 2 at every token
    assert head_usage_entropy([equal], pad).loss.item() == pytest.approx(1.0, abs=KNOWN)
    one = torch.zeros(B, H, T, D)
    one[:, 2] = torch.randn(B, T, D)
    result = head_usage_entropy([one], pad)
    assert result.loss.item() == pytest.approx(0.0, abs=KNOWN)
    assert result.diagnostics["max_share"] == pytest.approx(1.0)
    assert result.per_token is None


def test_pooled_heads_is_the_mean_over_real_tokens():
    x = random_inputs()
    pooled = pooled_heads(x["head_out"][0], x["pad"])
    b = 2  # 5 real tokens
    torch.testing.assert_close(pooled[b], x["head_out"][0][b, :, :5].mean(1))


def test_infonce_bound_cosine_critic_by_hand_and_the_clamped_loss():
    x, y = torch.randn(5, 3), torch.randn(5, 3)
    s = F.cosine_similarity(x[:, None], y[None], dim=-1) / 0.5
    by_hand = math.log(5) + (s.diagonal() - s.logsumexp(1)).mean()
    torch.testing.assert_close(infonce_bound(x, y, temperature=0.5), by_hand)
    # Perfectly dependent, well-separated samples reach the log N ceiling; y = -x is dependence too,
    # and the loss clamps its negative estimate to 0 instead of rewarding it.
    e = torch.eye(8)
    assert infonce_bound(e, e, temperature=0.01).item() == pytest.approx(math.log(8), abs=1e-3)
    head_out = torch.stack([e, -e], 1)[:, :, None, :]  # (B=8, H=2, T=1, 8)
    result = infonce_mi([head_out], torch.zeros(8, 1, dtype=torch.bool), temperature=0.1)
    assert result.diagnostics["raw_mean"] < -9 and result.loss.item() == 0.0


# ----------------------------------------------------------------------------------- invariances


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_padding_never_changes_a_loss(name):
    x = random_inputs()
    extra = 4
    g = torch.Generator().manual_seed(1)

    def garbage_padded(t: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
        """t grown by `extra` trailing positions along dims; the new positions hold huge values."""
        shape = list(t.shape)
        for dim in dims:
            shape[dim] += extra
        grown = torch.randn(shape, generator=g) * 1e3
        grown[tuple(slice(0, n) for n in t.shape)] = t
        return grown

    pad = padding(LENGTHS, T + extra)
    padded = {"pad": pad}
    for key in ("head_out", "head_contrib"):
        grown = [garbage_padded(t, (2,)) for t in x[key]]
        # Garbage inside the original padding too.
        padded[key] = [torch.where(pad[:, None, :, None], torch.randn(t.shape, generator=g) * 1e3, t) for t in grown]
    # Attention: garbage rows for padded queries and garbage columns for padded keys.
    pad_pair = pad[:, None, :, None] | pad[:, None, None, :]
    grown = [garbage_padded(a, (2, 3)) for a in x["attn"]]
    padded["attn"] = [torch.where(pad_pair, torch.randn(a.shape, generator=g) * 1e3, a) for a in grown]
    for t in padded["head_out"] + padded["head_contrib"] + padded["attn"]:
        t.requires_grad_(True)

    before, after = FUNCTIONS[name](x), FUNCTIONS[name](padded)
    # Longer rows (T + extra keys, the extra ones zero) may be summed in another order.
    close(after.loss, before.loss, KNOWN + tol(extra * B))
    if name in TOKEN_LEVEL:
        close(after.per_token[:, :T], before.per_token, KNOWN + tol(extra * B))
        assert (after.per_token[pad] == 0).all()
    after.loss.backward()  # ... nor a gradient: exactly 0 at every padded position
    grads = {k: [t.grad for t in padded[k] if t.grad is not None] for k in ("head_out", "head_contrib", "attn")}
    for grad in grads["head_out"] + grads["head_contrib"]:
        assert torch.isfinite(grad).all() and (grad[pad[:, None, :, None].expand_as(grad)] == 0).all()
    for grad in grads["attn"]:
        assert torch.isfinite(grad).all() and (grad[pad_pair.expand_as(grad)] == 0).all()


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_shuffling_the_batch_permutes_per_token_losses_and_keeps_batch_losses(name):
    x = random_inputs()
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    shuffled = {k: (v[perm] if k == "pad" else [t[perm] for t in v]) for k, v in x.items()}
    before, after = FUNCTIONS[name](x), FUNCTIONS[name](shuffled)
    close(after.loss, before.loss, KNOWN)
    if name in TOKEN_LEVEL:
        close(after.per_token, before.per_token[perm], KNOWN)
    else:
        assert before.per_token is None and after.per_token is None


# ------------------------------------------------------------------------------ where gradients go


@pytest.mark.parametrize("name", sorted(TOKEN_LEVEL | {"head_usage"}))
def test_gradients_match_finite_differences(name):
    # Attention has hand-written backward passes; check them (and the rest) in float64. Attention rows
    # are kept away from 0 so that finite differences do not cross the clamp at p = 0.
    lengths = torch.tensor([3, 2])
    pad = padding(lengths, 3)
    g = torch.Generator().manual_seed(0)
    attn = (torch.rand(2, 3, 3, 3, generator=g, dtype=torch.float64) + 0.1).masked_fill(pad[:, None, None, :], 0.0)
    attn = attn / attn.sum(-1, keepdim=True)
    x = {"pad": pad, "attn": [attn], "head_out": [torch.randn(2, 3, 3, 2, generator=g, dtype=torch.float64)],
         "head_contrib": [torch.randn(2, 3, 3, 4, generator=g, dtype=torch.float64)]}
    key = {"orthogonality_outputs": "head_out", "head_usage": "head_contrib"}.get(name, "attn")
    leaf = x[key][0].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: FUNCTIONS[name]({**x, key: [t]}).loss, (leaf,))


# A plain encoder (no sentence-local layer): every layer is constrained by default.
SMALL = ModelConfig(vocab_size=20, n_classes=5, d_model=16, n_heads=4, n_layers=2, d_ff=32, max_len=16, local_layers=0)


@pytest.fixture
def model_batch():
    model = Encoder(SMALL)
    tokens = torch.randint(0, 20, (8, 10))
    pad = padding(torch.tensor([10, 8, 6, 10, 4, 9, 7, 10]), 10)
    return model, tokens, pad


def reached(model: torch.nn.Module, loss: torch.Tensor) -> set[str]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}


def test_attention_entropy_reaches_queries_and_keys_only(model_batch):
    model, tokens, pad = model_batch
    out = model(tokens, pad, capture="attn")
    got = reached(model, attention_entropy([out.attn[1]], pad).loss)
    assert {"blocks.1.attn.W_Q", "blocks.1.attn.W_K", "blocks.0.attn.W_V"} <= got
    assert not got & {"blocks.1.attn.W_V", "blocks.1.attn.W_O", "head.weight", "head.bias", "ln_f.weight"}


def test_head_usage_and_output_orthogonality_do_not_reach_the_readout(model_batch):
    model, tokens, pad = model_batch
    readout = {"head.weight", "head.bias", "ln_f.weight", "ln_f.bias"}
    out = model(tokens, pad, capture=("head_out", "head_contrib"))
    usage = reached(model, head_usage_entropy(out.head_contrib, pad).loss)
    assert {"blocks.1.attn.W_O", "blocks.1.attn.W_V"} <= usage and not usage & readout
    out = model(tokens, pad, capture="head_out")
    outputs = reached(model, orthogonality_outputs(out.head_out, pad).loss)
    # head_out is read before W_O: the last layer's W_O (and the FFN after it) are out of reach.
    assert {"blocks.1.attn.W_V", "blocks.0.attn.W_O"} <= outputs
    assert not outputs & (readout | {"blocks.1.attn.W_O", "blocks.1.ff_in.weight"})


def test_weights_orthogonality_reaches_only_the_projections_it_names(model_batch):
    model, tokens, pad = model_batch
    cfg = ConstraintConfig(orthogonality=1.0, orthogonality_variant="weights", orthogonality_on="qv", layers=(1,))
    constraints = Constraints(cfg, SMALL)
    assert constraints.captures == frozenset()
    out = model(tokens, pad, capture=constraints.captures)
    penalty, terms = constraints.loss(out, pad, model)
    assert reached(model, penalty) == {"blocks.1.attn.W_Q", "blocks.1.attn.W_V"}
    assert set(terms) == {"orthogonality"}


def test_measure_reports_every_constraint_and_formulas_cover_them(model_batch):
    model, tokens, pad = model_batch
    out = model(tokens, pad, capture=MEASURE_CAPTURES)
    values = measure(out, pad, model)
    main = {k for k in values if "/" not in k and not k.startswith("orthogonality_weights_")}
    assert main == {"orthogonality_outputs", "orthogonality_weights", "orthogonality_attention",
                    "attention_entropy", "head_usage"}
    assert all(math.isfinite(v) for v in values.values())
    # MI needs a trained estimator (analysis.estimate_head_mi); the contribution variant is not yet a
    # measure of every run (adding one changes what finished runs record: a CODE_VERSION bump).
    published = {"orthogonality_published", "mi_published", "attention_entropy_published", "head_usage_published"}
    assert main | {"infonce", "club", "orthogonality_contributions"} | published == set(FORMULAS)
    assert not any("$" in f or "\\" in f for f in FORMULAS.values())  # Unicode math, no LaTeX
    mistune = pytest.importorskip("mistune")  # nbconvert's Markdown renderer
    for formula in FORMULAS.values():  # the bold title renders, and no stray _ or * turns into emphasis
        html = mistune.html(formula)
        assert html.count("<strong>") == 1 and "<em>" not in html


# ----------------------------------------------------------------------------- the published losses


def test_published_orthogonality_by_hand():
    pad = torch.zeros(1, 1, dtype=torch.bool)
    orthogonal = torch.tensor([[1.0, 0.0], [0.0, 3.0]])[None, :, None, :]  # (B=1, H=2, T=1, 2): r = e_0, e_1
    assert published_orthogonality([orthogonal], pad).loss.item() == pytest.approx(0.0, abs=KNOWN)
    same = torch.tensor([[1.0, 0.0], [2.0, 0.0]])[None, :, None, :]  # G = all ones: (G - I)² has two 1s of four
    assert published_orthogonality([same], pad).loss.item() == pytest.approx(0.5, abs=KNOWN)


def test_published_infonce_by_hand_and_its_sign():
    # Two samples, two identical heads: logits = I / 0.2, so each row's CE is log(1 + e^-5).
    r = torch.eye(2)[:, None, None, :].expand(2, 2, 1, 2)  # (B=2, H=2, T=1, d=2)
    result = published_infonce([r], torch.zeros(2, 1, dtype=torch.bool))
    assert result.loss.item() == pytest.approx(math.log(1 + math.exp(-5)), abs=KNOWN)
    assert result.diagnostics["infonce"] == pytest.approx(math.log(2) - math.log(1 + math.exp(-5)), abs=KNOWN)
    # The sign, measured independently: minimising the published term on a toy pair of heads raises the
    # InfoNCE estimate of their MI by a freshly trained critic (analysis.estimate_mi), from about 0.
    from disentangle.analysis import estimate_mi

    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 4, generator=g)
    y = torch.randn(256, 4, generator=g).requires_grad_(True)
    pad = torch.zeros(256, 1, dtype=torch.bool)
    before = estimate_mi(x[None], y.detach()[None], "infonce", steps=150, seed=0).item()
    opt = torch.optim.Adam([y], lr=0.05)
    for _ in range(100):
        loss = published_infonce([torch.stack([x, y], 1)[:, :, None, :]], pad).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = estimate_mi(x[None], y.detach()[None], "infonce", steps=150, seed=0).item()
    assert before < 0.2 and after > before + 1.0, (before, after)


def test_published_attention_entropy_and_head_usage_by_hand():
    pad = torch.tensor([[False, False, True]])  # two real tokens
    uniform = attention_from_scores(torch.zeros(1, 2, 3, 3), pad)
    assert published_attention_entropy([uniform], pad).loss.item() == pytest.approx(math.log(2), abs=KNOWN)  # nats
    assert attention_entropy([uniform], pad).loss.item() == pytest.approx(1.0, abs=KNOWN)  # ours: / log n
    equal = F.normalize(torch.randn(1, 2, 3, 4), dim=-1)
    assert published_head_usage([equal], pad).loss.item() == pytest.approx(math.log(2), abs=KNOWN)
    one = torch.zeros(1, 2, 3, 4)
    one[:, 0] = torch.randn(1, 3, 4)
    assert published_head_usage([one], pad).loss.item() == pytest.approx(0.0, abs=KNOWN)


@pytest.mark.parametrize("name", ["orthogonality", "mutual_information", "attention_entropy", "head_usage"])
def test_published_variants_train_through_the_objective(name, model_batch):
    from disentangle import arms
    from disentangle.objective import Constraints

    model, tokens, pad = model_batch
    arm = arms.get(name)
    cfg = ConstraintConfig(**{name: 0.1, arm.variant_field: "published"})
    constraints = Constraints(cfg, SMALL)
    assert constraints.states == {}  # the published MI term has no critic to train
    out = model(tokens, pad, capture=constraints.captures)
    total, terms = constraints.loss(out, pad, model)
    assert torch.isfinite(total) and set(terms) == {name}
    total.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
