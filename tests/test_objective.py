"""The training objective (disentangle.objective.Constraints): the weighted sum of the active arms' losses,
minimal captures, exact zero when nothing is active, the MI estimator's state and alternation."""

import copy

import pytest
import torch
import torch.nn.functional as F
from test_constraints import SMALL, _one_thread, model_batch, padding, reached  # noqa: F401 (fixtures; _one_thread autouse)
from torch import Tensor

from disentangle.config import ConstraintConfig
from disentangle.constraints import (
    CLUB,
    MEASURE_CAPTURES,
    attention_entropy,
    head_usage_entropy,
    infonce_mi,
    measure,
    orthogonality_outputs,
)
from disentangle.model import Encoder, EncoderOutput, ModelConfig
from disentangle.objective import Constraints


def club_of(constraints: Constraints) -> CLUB:
    """The CLUB q held by the mutual-information arm's state."""
    return constraints.states["mutual_information"].estimator


def club_constraints(seed: int = 0, **overrides) -> Constraints:
    torch.manual_seed(seed)
    cfg = ConstraintConfig(mutual_information=1.0, mi_variant="club", mi_hidden=8, mi_lr=1e-2, **overrides)
    return Constraints(cfg, SMALL)


def rig_identity_q(club: CLUB) -> None:
    """Make q(y|x) = N(x, I) exactly (hidden = [relu(x), relu(-x)], μ = relu(x) - relu(-x)), so that
    I_CLUB = Σ_d corr(x_d, y_d) on standardised inputs: positive for some pairs, whatever the model."""
    net, d = club.net, club.net.w1.shape[1]
    eye = torch.eye(d)
    with torch.no_grad():
        for p in (net.w1, net.b1, net.w2, net.b2):
            p.zero_()
        net.w1[:] = torch.cat([eye, -eye], 1)
        net.w2[:, :, :d] = torch.cat([eye, -eye], 0)


def test_club_model_side_loss_does_not_update_q(model_batch):
    model, tokens, pad = model_batch
    constraints = club_constraints()  # mi_hidden = 8 = 2 · d_head
    rig_identity_q(club_of(constraints))
    before = copy.deepcopy(club_of(constraints).state_dict())
    out = model(tokens, pad, capture=constraints.captures)
    penalty, terms = constraints.loss(out, pad, model)
    assert terms["mutual_information"] > 0
    got = reached(model, penalty)
    assert {"blocks.0.attn.W_V", "blocks.1.attn.W_V"} <= got and "head.weight" not in got
    assert all(p.grad is None for p in club_of(constraints).parameters())
    model.zero_grad(set_to_none=True)
    constraints.auxiliary_step(out, pad)  # q moves on its own step, from detached representations
    assert any(not torch.equal(a, b) for a, b in zip(before.values(), club_of(constraints).state_dict().values()))
    assert all(p.grad is None for p in model.parameters())


def test_club_gradient_reaches_the_heads_when_the_estimate_is_positive():
    torch.manual_seed(0)
    club = CLUB(1, 3, 3, hidden=8)
    x = torch.randn(1, 64, 3, requires_grad=True)
    y = (x.detach() + 0.1 * torch.randn(1, 64, 3)).requires_grad_(True)
    for _ in range(200):  # fit q so that it sees the dependence
        club.zero_grad()
        (-club.log_likelihood(x.detach(), y.detach())).sum().backward()
        torch.optim.SGD(club.parameters(), lr=0.1).step()
    club.zero_grad(set_to_none=True)
    est = club(x, y, frozen=True)
    assert est.item() > 1.0
    perm = torch.randperm(64)  # a batch-level estimate: the order of the samples does not matter
    torch.testing.assert_close(club(x[:, perm], y[:, perm]), est)
    est.sum().backward()
    assert x.grad.abs().sum() > 0 and y.grad.abs().sum() > 0
    assert all(p.grad is None for p in club.parameters())


# ------------------------------------------------------------------------ the training object


def test_all_weights_zero_is_exactly_the_task_loss_and_captures_nothing(model_batch):
    model, tokens, pad = model_batch
    constraints = Constraints(ConstraintConfig(), SMALL)
    assert constraints.captures == frozenset()
    out = model(tokens, pad, capture=constraints.captures)
    ce = F.cross_entropy(out.logits, torch.randint(0, 5, (8,)))
    penalty, terms = constraints.loss(out, pad, model)
    assert penalty.dim() == 0 and penalty.item() == 0.0 and terms == {}
    assert torch.equal(ce + penalty, ce)
    assert constraints.auxiliary_step(out, pad) == {} and constraints.state_dict() == {}


@pytest.mark.parametrize(
    "overrides, captures",
    [
        ({"orthogonality": 0.1}, {"head_out"}),
        ({"orthogonality": 0.1, "orthogonality_variant": "weights"}, set()),
        ({"orthogonality": 0.1, "orthogonality_variant": "attention"}, {"attn"}),
        ({"orthogonality": 0.1, "orthogonality_variant": "contributions"}, {"head_contrib"}),
        ({"mutual_information": 0.1}, {"head_out"}),
        ({"mutual_information": 0.1, "mi_variant": "club"}, {"head_out"}),
        ({"attention_entropy": 0.1}, {"attn"}),
        ({"head_usage": 0.1}, {"head_contrib"}),
        ({"head_usage": 0.1, "orthogonality": 0.1, "orthogonality_variant": "weights"}, {"head_contrib"}),
    ],
)
def test_captures_are_minimal(overrides, captures):
    assert Constraints(ConstraintConfig(**overrides), SMALL).captures == frozenset(captures)


def test_loss_is_the_weighted_sum_over_the_selected_layers(model_batch):
    model, tokens, pad = model_batch
    cfg = ConstraintConfig(attention_entropy=0.3, head_usage=0.2, orthogonality=0.5, layers=(1,))
    constraints = Constraints(cfg, SMALL)
    out = model(tokens, pad, capture=constraints.captures)
    penalty, terms = constraints.loss(out, pad, model)
    ent = attention_entropy([out.attn[1]], pad).loss
    usage = head_usage_entropy([out.head_contrib[1]], pad).loss
    ortho = orthogonality_outputs([out.head_out[1]], pad).loss
    torch.testing.assert_close(penalty, 0.5 * ortho + 0.3 * ent + 0.2 * usage)
    expected = {"orthogonality": ortho.item(), "attention_entropy": ent.item(), "head_usage": usage.item()}
    assert terms == pytest.approx(expected)
    with pytest.raises(ValueError, match="constraints.layers"):
        Constraints(ConstraintConfig(layers=(2,)), SMALL)


def test_loss_under_bf16_autocast_is_computed_in_float32(model_batch):
    model, tokens, pad = model_batch
    constraints = Constraints(ConstraintConfig(attention_entropy=1.0, mutual_information=1.0), SMALL)
    out = model(tokens, pad, capture=constraints.captures)
    plain, _ = constraints.loss(out, pad, model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed, _ = constraints.loss(out, pad, model)
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, plain)


def test_club_state_dict_round_trip_gives_identical_continuation(model_batch):
    model, tokens, pad = model_batch
    out = model(tokens, pad, capture="head_out")
    first = club_constraints(seed=0)
    for _ in range(3):
        first.auxiliary_step(out, pad)
    state = copy.deepcopy(first.state_dict())
    second = club_constraints(seed=1)  # a different initialisation, overwritten by the state
    second.load_state_dict(state)
    for _ in range(3):
        logs = first.auxiliary_step(out, pad), second.auxiliary_step(out, pad)
        assert logs[0] == logs[1]
    for a, b in zip(club_of(first).parameters(), club_of(second).parameters()):
        assert torch.equal(a, b)
    assert torch.equal(first.loss(out, pad, model)[0], second.loss(out, pad, model)[0])
    with pytest.raises(ValueError, match="no MI estimator"):
        Constraints(ConstraintConfig(), SMALL).load_state_dict(state)


def test_default_layers_are_the_global_ones():
    """With a sentence-local first layer, constraints and measures default to the layers after it."""
    cfg = ModelConfig(vocab_size=20, n_classes=5, d_model=16, n_heads=4, n_layers=3, d_ff=32, max_len=16, local_layers=1)
    assert Constraints(ConstraintConfig(head_usage=1.0), cfg).layers == (1, 2)
    assert Constraints(ConstraintConfig(head_usage=1.0, layers=(0,)), cfg).layers == (0,)
    torch.manual_seed(0)
    model = Encoder(cfg)
    tokens = torch.randint(1, 20, (3, 8))
    pad = torch.zeros(3, 8, dtype=torch.bool)
    segments = torch.tensor([[0, 1, 1, 1, 2, 2, 0, 0]] * 3)
    out = model(tokens, pad, capture=MEASURE_CAPTURES, segments=segments)
    default = measure(out, pad, model)
    assert default["attention_entropy"] == pytest.approx(measure(out, pad, model, layers=(1, 2))["attention_entropy"])
    assert default["attention_entropy"] != pytest.approx(measure(out, pad, model, layers=(0,))["attention_entropy"])



def heads_batch(shared: bool, seed: int, B: int = 64) -> tuple[list[Tensor], Tensor]:
    """One layer, two heads, one token each, a fresh batch per seed: head 1 = a fixed rotation of head 0
    (fully dependent, yet not cosine-aligned with it), or independent noise."""
    rotation = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(99))).Q
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 4, generator=g)
    y = x @ rotation if shared else torch.randn(B, 4, generator=g)
    head_out = torch.stack([x, y], 1)[:, :, None, :]  # (B, H=2, T=1, d_head=4)
    return [head_out], torch.zeros(B, 1, dtype=torch.bool)


def as_output(head_out: list[Tensor], B: int) -> EncoderOutput:
    return EncoderOutput(torch.zeros(B, 2), frozenset({"head_out"}), [{"head_out": head_out[0]}])


def trained_infonce(shared: bool, steps: int = 200) -> Constraints:
    """The InfoNCE constraint after its critic took ``steps`` alternating steps, one fresh batch each (as in training)."""
    torch.manual_seed(0)
    cfg = ConstraintConfig(mutual_information=1.0, mi_variant="infonce", mi_hidden=16, mi_lr=1e-2)
    constraints = Constraints(cfg, ModelConfig(vocab_size=5, n_classes=2, d_model=8, n_heads=2, n_layers=1, local_layers=0))
    for step in range(steps):
        head_out, pad = heads_batch(shared, seed=step)
        constraints.auxiliary_step(as_output(head_out, len(pad)), pad)
    return constraints


def test_the_trained_infonce_critic_sees_dependence_that_a_fixed_cosine_critic_misses():
    head_out, pad = heads_batch(shared=True, seed=10_000)  # a batch no critic trained on
    fixed = infonce_mi(head_out, pad, temperature=0.1).loss
    assert fixed.item() < 0.5  # a rotation defeats the cosine of the raw outputs
    trained = trained_infonce(shared=True).loss(as_output(head_out, len(pad)), pad, None)[1]["mutual_information"]
    assert trained > 2.0  # log 64 = 4.16 is the ceiling
    independent, pad_i = heads_batch(shared=False, seed=10_000)
    blind = trained_infonce(shared=False).loss(as_output(independent, len(pad_i)), pad_i, None)[1]["mutual_information"]
    assert blind < 0.5


def test_the_infonce_loss_reaches_the_heads_but_not_the_critic():
    constraints = trained_infonce(shared=True, steps=50)
    head_out, pad = heads_batch(shared=True, seed=10_000)
    head_out = [head_out[0].clone().requires_grad_(True)]
    constraints.states["mutual_information"].estimator.zero_grad(set_to_none=True)  # left over from the critic's own last step
    penalty, _ = constraints.loss(as_output(head_out, len(pad)), pad, None)
    penalty.backward()
    assert head_out[0].grad is not None and head_out[0].grad.abs().sum() > 0
    assert all(p.grad is None for p in constraints.states["mutual_information"].estimator.parameters())
    again = trained_infonce(shared=True, steps=0)
    again.load_state_dict(copy.deepcopy(constraints.state_dict()))
    torch.testing.assert_close(again.loss(as_output(head_out, len(pad)), pad, None)[0], penalty.detach())



def test_an_architecture_loss_joins_the_objective_with_its_weight():
    cfg = ModelConfig(vocab_size=20, n_classes=5, d_model=16, n_heads=4, n_layers=2, d_ff=32, max_len=16,
                      local_layers=0, routed_top_k=2, routing_balance=0.5)
    torch.manual_seed(0)
    model = Encoder(cfg)
    tokens, pad = torch.randint(0, 20, (8, 10)), padding(torch.tensor([10, 8, 6, 10, 4, 9, 7, 10]), 10)
    constraints = Constraints(ConstraintConfig(head_usage=0.1), cfg)
    out = model(tokens, pad, capture=constraints.captures)
    total, terms = constraints.loss(out, pad, model)
    assert set(terms) == {"head_usage", "load_balance"}
    torch.testing.assert_close(total, 0.1 * torch.tensor(terms["head_usage"]) + 0.5 * out.aux["load_balance"].detach())
