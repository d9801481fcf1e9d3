"""The encoder: config validation, capture shapes, explicit vs fused attention, padding, seeds, ablation."""

import math

import pytest
import torch
import torch.nn.functional as F

from disentangle.model import CAPTURABLE, Encoder, ModelConfig, NotCapturedError
from disentangle.schema import ConfigError
from numerics import assert_close, tol

V, C = 23, 7  # vocab size, answer classes


def make_cfg(**kw) -> ModelConfig:
    # A plain encoder unless a test asks for sentence-local layers (tested on their own below).
    base = dict(vocab_size=V, n_classes=C, d_model=32, n_heads=4, n_layers=2, d_ff=48, max_len=32, local_layers=0)
    return ModelConfig(**{**base, **kw})


def batch(B: int = 5, T: int = 12, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded batch (CLS at 0 is always real); row 0 has no padding, the others 3..T real tokens."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, T + 1, (B,), generator=g)
    lengths[0] = T
    padding = torch.arange(T)[None, :] >= lengths[:, None]
    tokens = torch.randint(1, V, (B, T), generator=g).masked_fill(padding, 0)
    return tokens, padding


def chain(cfg: ModelConfig, T: int, backward: bool = False) -> int:
    """Roundings two evaluations of the encoder may differ by (tests/numerics.py): per layer, the lengths
    of its reductions (two LayerNorms and the Q/K/V, W_O and FFN matmuls over d_model or d_ff, scores over
    d_head, softmax and values over T keys), plus the final LayerNorm and readout. Backward doubles it."""
    per_layer = 2 * cfg.d_model + cfg.d_model + cfg.d_head + 2 * T + cfg.d_model + cfg.d_model + cfg.d_ff
    n = cfg.n_layers * per_layer + 2 * cfg.d_model
    return 2 * n if backward else n


def rows_sum_to_one(attn: torch.Tensor) -> None:
    """Softmax rows sum to 1 within the roundings of its normalising sum and of this one, over T keys."""
    torch.testing.assert_close(attn.sum(-1), torch.ones(attn.shape[:-1]), atol=tol(2 * attn.shape[-1]), rtol=0)


def model_for(cfg: ModelConfig, seed: int = 0) -> Encoder:
    torch.manual_seed(seed)
    model = Encoder(cfg).eval()
    with torch.no_grad():  # biases start at 0; make them matter so the tests can see them
        for name, p in model.named_parameters():
            if p.dim() == 1 and not name.endswith(("ln1.weight", "ln2.weight", "ln_f.weight")):
                p.normal_(0.0, 0.1)
    return model


# ---------------------------------------------------------------- config


def test_config_names_the_bad_field():
    with pytest.raises(ConfigError, match=r"d_model=50 is not divisible by n_heads=4"):
        ModelConfig(d_model=50, n_heads=4)


def test_config_reports_every_problem_at_once():
    with pytest.raises(ConfigError) as err:
        ModelConfig(vocab_size=0, d_model=-8, n_layers=0, d_ff=0, max_len=0, dropout=1.0,
                    pos_encoding="alibi", readout="max")
    text = "\n".join(err.value.problems)
    for field in ("vocab_size=0", "d_model=-8", "n_layers=0", "d_ff=0", "max_len=0", "dropout=1.0",
                  "pos_encoding='alibi'", "readout='max'"):
        assert field in text, (field, text)
    assert "['rope', 'learned', 'sinusoidal']" in text and "['cls', 'mean']" in text


def test_config_type_errors_are_named():
    with pytest.raises(ConfigError) as err:
        ModelConfig(d_model="64", dropout="high", bias=1)
    text = "\n".join(err.value.problems)
    assert "d_model='64' must be an integer" in text
    assert "dropout='high' must be a number" in text
    assert "bias=1 must be true or false" in text


def test_from_dict_rejects_unknown_keys_with_a_hint_and_reports_bad_values_too():
    with pytest.raises(ConfigError) as err:
        ModelConfig.from_dict({"d_modle": 64, "n_heads": 0})
    text = "\n".join(err.value.problems)
    assert "d_modle: unknown key" in text and "did you mean 'd_model'" in text
    assert "n_heads=0 must be > 0" in text
    assert ModelConfig.from_dict({"d_model": 48, "n_heads": 3}).d_head == 16


def test_encoder_refuses_unset_vocab_and_classes():
    with pytest.raises(ValueError, match=r"vocab_size and n_classes must be set"):
        Encoder(ModelConfig())
    with pytest.raises(ValueError, match=r"ModelConfig.n_classes must be set"):
        Encoder(ModelConfig(vocab_size=10))


def test_biases_start_at_zero_and_parameter_count():
    model = Encoder(make_cfg(pos_encoding="learned"))
    for name, p in model.named_parameters():
        if name.endswith(("b_QKV", "b_O", ".bias")):
            assert torch.all(p == 0), name
    assert model.num_params() == sum(p.numel() for p in model.parameters())
    d, H, dh, L, ff = 32, 4, 8, 2, 48
    per_layer = 4 * d * d + 3 * d + d + 2 * 2 * d + d * ff + ff + ff * d + d
    assert model.num_params() == V * d + 32 * d + L * per_layer + 2 * d + d * C + C


# ---------------------------------------------------------------- shapes

CONFIGS = {
    "1-layer": dict(n_layers=1),
    "3-layer-sinusoidal-mean": dict(n_layers=3, pos_encoding="sinusoidal", readout="mean"),
    "odd-widths-no-bias": dict(d_model=24, n_heads=3, d_ff=40, bias=False),
}


@pytest.mark.parametrize("kw", CONFIGS.values(), ids=CONFIGS.keys())
def test_shapes_of_every_capture(kw):
    cfg = make_cfg(**kw)
    model = model_for(cfg)
    tokens, padding = batch(B=3, T=9)
    out = model(tokens, padding, capture=True)
    H, dh, d = cfg.n_heads, cfg.d_head, cfg.d_model
    assert out.logits.shape == (3, C)
    assert out.captured == frozenset(CAPTURABLE)
    for name, shape in (("attn", (3, H, 9, 9)), ("head_out", (3, H, 9, dh)), ("head_contrib", (3, H, 9, d)),
                        ("resid_mid", (3, 9, d))):
        per_layer = getattr(out, name)
        assert len(per_layer) == cfg.n_layers
        assert all(t.shape == shape for t in per_layer), (name, [t.shape for t in per_layer])
    for which in "qkv":
        ws = model.per_head_weights(which)
        assert len(ws) == cfg.n_layers and all(w.shape == (H, d, dh) for w in ws)
        assert all(isinstance(w, torch.nn.Parameter) for w in ws)
    with pytest.raises(ValueError, match=r"which='o' is not one of"):
        model.per_head_weights("o")


def test_resid_mid_is_the_block_input_plus_the_heads_contributions():
    # layer 0 of a rotary model: its input is the token embedding, so after attention the stream holds
    # exactly that plus sum_h z_h W_O[h] + b_O (the heads' contributions), up to the rounding of one sum over H
    cfg = make_cfg()
    model = model_for(cfg)
    tokens, padding = batch()
    out = model(tokens, padding, capture=("resid_mid", "head_contrib"))
    expected = model.tok_emb(tokens) + out.head_contrib[0].sum(1) + model.blocks[0].attn.b_O
    assert_close(out.resid_mid[0], expected.detach(), n=cfg.n_heads + cfg.d_model + cfg.d_head)
    with pytest.raises(NotCapturedError, match="'resid_mid' was not captured"):
        model(tokens, padding).resid_mid


def test_per_head_math_matches_a_loop_over_heads():
    """attn = softmax(q k^T / sqrt(d_head)) over real keys; output = sum_h z_h W_O[h] + b_O."""
    cfg = make_cfg(n_layers=1, pos_encoding="learned")
    model = model_for(cfg)
    tokens, padding = batch(B=3, T=8)
    seen = {}
    model.blocks[0].attn.register_forward_hook(lambda m, args, out: seen.update(x=args[0], out=out[0]))
    out = model(tokens, padding, capture=True)
    attn, x = model.blocks[0].attn, seen["x"]
    b = attn.b_QKV.view(3, cfg.n_heads, cfg.d_head)
    total = attn.b_O.expand_as(x).clone()
    T = tokens.shape[1]
    n = cfg.d_model + cfg.d_head + 2 * T + cfg.d_head  # q/k/v, scores, softmax and values, W_O[h]
    for h in range(cfg.n_heads):
        q, k, v = x @ attn.W_Q[h] + b[0, h], x @ attn.W_K[h] + b[1, h], x @ attn.W_V[h] + b[2, h]
        scores = (q @ k.transpose(1, 2)) / math.sqrt(cfg.d_head)
        probs = scores.masked_fill(padding[:, None, :], float("-inf")).softmax(-1)
        assert_close(out.attn[0][:, h], probs, n)
        assert_close(out.head_out[0][:, h], probs @ v, n)
        assert_close(out.head_contrib[0][:, h], probs @ v @ attn.W_O[h], n)
        total = total + probs @ v @ attn.W_O[h]
    assert_close(seen["out"], total, n + cfg.n_heads)


# ---------------------------------------------------------------- explicit vs fused


def test_explicit_and_fused_paths_agree(monkeypatch):
    cfg = make_cfg(n_layers=3)
    model = model_for(cfg)
    tokens, padding = batch(B=6, T=16)
    explicit = model(tokens, padding, capture=("attn", "head_out", "head_contrib"))
    fused = model(tokens, padding, capture=("head_out", "head_contrib"))  # no "attn": fused path
    plain = model(tokens, padding)
    diffs = {"logits": (explicit.logits - plain.logits).abs()}
    for name in ("head_out", "head_contrib"):
        for layer, (a, b) in enumerate(zip(getattr(explicit, name), getattr(fused, name))):
            diffs[f"{name}[{layer}]"] = (a - b).abs()
    # gradients of the same loss through the two paths
    model.train()
    grads = []
    for capture in ("attn", None):
        model.zero_grad()
        F.cross_entropy(model(tokens, padding, capture=capture).logits, torch.arange(6) % C).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    diffs["grad (all params)"] = (grads[0] - grads[1]).abs()
    scales = {"logits": plain.logits.abs().max(), "grad (all params)": grads[1].abs().max()}
    print("\nexplicit vs fused attention, |difference| against the derived bound:")
    for name, diff in diffs.items():
        bound = tol(chain(cfg, 16, backward=name.startswith("grad")), max(scales.get(name, 1.0), 1.0))
        print(f"  {name:<18} max {diff.max().item():.3e}  mean {diff.mean().item():.3e}  bound {bound:.1e}")
        assert diff.max() <= bound, name
    assert_close(fused.logits, plain.logits, chain(cfg, 16))  # capturing heads: same function

    calls = []
    real_sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or real_sdpa(*a, **k))
    model(tokens, padding)
    assert len(calls) == 3  # nothing captured: the fused kernel in every layer
    model(tokens, padding, capture=("head_out", "head_contrib"))
    assert len(calls) == 6
    model(tokens, padding, capture="attn")
    assert len(calls) == 6  # the explicit softmax


# ---------------------------------------------------------------- padding


def test_attention_rows_sum_to_one_over_real_keys_and_are_zero_on_padding():
    model = model_for(make_cfg(n_layers=2))
    tokens, padding = batch(B=6, T=14)
    assert padding.any()
    for layer_attn in model(tokens, padding, capture="attn").attn:
        key_pad = padding[:, None, None, :].expand_as(layer_attn)
        assert torch.all(layer_attn[key_pad] == 0)  # exactly 0, for every query (padding queries too)
        rows_sum_to_one(layer_attn)


@pytest.mark.parametrize("readout", ["cls", "mean"])
@pytest.mark.parametrize("capture", [None, ("head_out", "head_contrib"), True], ids=["fused", "fused+heads", "explicit"])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_padding_changes_nothing_for_real_tokens(readout, capture, mode):
    model = model_for(make_cfg(readout=readout, dropout=0.0))
    model.train(mode == "train")
    tokens, padding = batch(B=5, T=10)
    extra = 6
    tokens2 = torch.cat([tokens, torch.randint(1, V, (5, extra))], 1)  # padding columns with arbitrary ids
    padding2 = torch.cat([padding, torch.ones(5, extra, dtype=torch.bool)], 1)
    tokens2[:, :10] = torch.where(padding, torch.randint(1, V, tokens.shape), tokens)  # and new ids under old padding
    a, b = model(tokens, padding, capture=capture), model(tokens2, padding2, capture=capture)
    n = chain(model.cfg, 10 + extra)
    assert_close(a.logits, b.logits, n)
    real = ~padding  # (B, T): compare only real query positions
    for name in a.captured - {"attractors"}:  # attractors are integer ids, (B, T): this model has no memory
        for x, y in zip(getattr(a, name), getattr(b, name)):
            if name == "resid_mid":  # per token, (B, T, d_model)
                assert_close(x[real], y[:, :10][real], n)
                continue
            if name == "attn":
                y, tail = y[..., :10], y[..., 10:]
                assert torch.all(tail == 0)
            x, y = x[:, :, :10].transpose(1, 2)[real], y[:, :, :10].transpose(1, 2)[real]  # (n_real, H, ...)
            assert_close(x, y, n)


# ---------------------------------------------------------------- gradients, seeds, dropout


@pytest.mark.parametrize("kw", [dict(), dict(pos_encoding="sinusoidal", readout="mean", dropout=0.1)], ids=["learned-cls", "sinusoidal-mean-dropout"])
@pytest.mark.parametrize("capture", [None, True], ids=["fused", "explicit"])
def test_every_parameter_gets_a_finite_gradient(kw, capture):
    model = model_for(make_cfg(**kw)).train()
    tokens, padding = batch(B=6, T=12)
    out = model(tokens, padding, capture=capture)
    F.cross_entropy(out.logits, torch.arange(6) % C).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        if name != "pos_emb":  # learned rows beyond T = 12 get no gradient, which is fine
            assert p.grad.abs().sum() > 0, name


def test_gradients_flow_through_captures():
    """Constraints are losses on the captured tensors: they must reach the head's parameters."""
    model = model_for(make_cfg()).train()
    tokens, padding = batch()
    out = model(tokens, padding, capture=True)
    (out.attn[1].pow(2).sum() + out.head_out[0].pow(2).sum() + out.head_contrib[0].pow(2).sum()).backward()
    assert model.blocks[1].attn.W_Q.grad.abs().sum() > 0
    assert model.blocks[0].attn.W_V.grad.abs().sum() > 0
    assert model.blocks[0].attn.W_O.grad.abs().sum() > 0


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_same_seed_gives_bitwise_identical_outputs(dropout):
    tokens, padding = batch()

    def run(seed):
        torch.manual_seed(seed)
        model = Encoder(make_cfg(dropout=dropout)).train()
        out = model(tokens, padding, capture=True)
        F.cross_entropy(out.logits, torch.arange(5) % C).backward()
        return [out.logits, *out.attn, *out.head_contrib, *(p.grad for p in model.parameters())]

    first, second, other = run(3), run(3), run(4)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert not torch.equal(first[0], other[0])


def test_dropout_in_train_mode_captures_attention_before_dropout():
    model = model_for(make_cfg(dropout=0.5)).train()
    tokens, padding = batch()
    out = model(tokens, padding, capture="attn")
    for layer_attn in out.attn:
        rows_sum_to_one(layer_attn)
        assert torch.all(layer_attn[padding[:, None, None, :].expand_as(layer_attn)] == 0)
    assert not torch.allclose(out.logits, model.eval()(tokens, padding).logits)  # dropout was active
    model.train()
    assert torch.isfinite(model(tokens, padding).logits).all()  # fused path with dropout


# ---------------------------------------------------------------- ablation


@pytest.mark.parametrize("capture", [None, True], ids=["fused", "explicit"])
@pytest.mark.parametrize("layer", [0, 1])
def test_ablating_all_heads_of_a_layer_leaves_only_the_residual_path(capture, layer):
    cfg = make_cfg()
    model = model_for(cfg)
    tokens, padding = batch()
    block = model.blocks[layer]
    seen = {}
    block.register_forward_pre_hook(lambda m, args: seen.update(x=args[0]))
    block.ln2.register_forward_pre_hook(lambda m, args: seen.update(mid=args[0]))  # x + attention(ln1(x))
    with model.ablate_heads([(layer, h) for h in range(cfg.n_heads)]):
        out = model(tokens, padding, capture=capture)
    torch.testing.assert_close(seen["mid"], seen["x"] + block.attn.b_O, atol=0, rtol=0)
    if capture:
        assert torch.all(out.head_contrib[layer] == 0) and torch.all(out.head_out[layer] == 0)
        other = 1 - layer
        assert out.head_contrib[other].abs().sum() > 0


def test_ablating_one_head_changes_logits_and_the_context_restores_everything():
    model = model_for(make_cfg())
    tokens, padding = batch()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    before = model(tokens, padding, capture=True)
    before_plain = model(tokens, padding).logits
    with model.ablate_heads([(1, 2)]) as m:
        assert m is model
        ablated = model(tokens, padding, capture=True)
        assert torch.all(ablated.head_out[1][:, 2] == 0)
        assert ablated.head_out[1][:, 1].abs().sum() > 0
        torch.testing.assert_close(ablated.head_out[0], before.head_out[0])  # earlier layer untouched
        assert not torch.allclose(ablated.logits, before.logits)
        with model.ablate_heads([(0, 0)]):  # nested: both ablated
            nested = model(tokens, padding, capture="head_out")
            assert torch.all(nested.head_out[0][:, 0] == 0) and torch.all(nested.head_out[1][:, 2] == 0)
        torch.testing.assert_close(model(tokens, padding).logits, ablated.logits)  # inner exit keeps the outer
    assert torch.equal(model(tokens, padding).logits, before_plain)
    with pytest.raises(RuntimeError, match="boom"):
        with model.ablate_heads([(0, 1), (1, 3)]):
            raise RuntimeError("boom")
    assert torch.equal(model(tokens, padding).logits, before_plain)
    assert all(b.attn.head_mask is None for b in model.blocks)
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_a_graph_built_under_ablation_can_be_backpropagated_after_it():
    model = model_for(make_cfg()).train()
    tokens, padding = batch()
    with model.ablate_heads([(0, 1)]):
        loss = model(tokens, padding).logits.sum()
    loss.backward()  # the ablation mask was replaced, not edited in place
    W_O = model.blocks[0].attn.W_O.grad
    assert torch.all(W_O[1] == 0) and W_O[0].abs().sum() > 0  # the ablated head gets no gradient


@pytest.mark.parametrize("heads, message", [
    ([(2, 0)], r"head \(2, 0\) does not exist: layers 0..1, heads 0..3"),
    ([(0, 4)], r"head \(0, 4\) does not exist"),
    ([(0, -1)], r"head \(0, -1\) does not exist"),
    ([(0, 1), 3], r"heads must be \(layer, head\) pairs of ints, got 3"),
    ([(0, 1, 2)], r"pairs of ints, got \(0, 1, 2\)"),
    ([(0, 1.0)], r"pairs of ints"),
    ([(True, 0)], r"pairs of ints"),
])
def test_ablate_heads_rejects_nonexistent_heads(heads, message):
    model = model_for(make_cfg())
    with pytest.raises(ValueError, match=message):
        with model.ablate_heads(heads):
            pass
    assert all(b.attn.head_mask is None for b in model.blocks)  # nothing was applied


# ---------------------------------------------------------------- capture names and bad inputs


def test_capture_names_are_validated():
    model = model_for(make_cfg())
    tokens, padding = batch()
    with pytest.raises(ValueError, match=r"capture=\['atn'\] is not capturable \(allowed: \['attn', 'head_out', 'head_contrib', 'gates', 'attractors', 'resid_mid'\]"):
        model(tokens, padding, capture="atn")
    with pytest.raises(ValueError, match=r"\['bogus'\]"):
        model(tokens, padding, capture=["attn", "bogus"])
    assert model(tokens, padding, capture="all").captured == frozenset(CAPTURABLE)
    assert model(tokens, padding, capture=False).captured == frozenset()


def test_reading_an_uncaptured_internal_raises():
    model = model_for(make_cfg())
    tokens, padding = batch()
    out = model(tokens, padding)
    for name in CAPTURABLE:
        with pytest.raises(NotCapturedError, match=rf"'{name}' was not captured.*capture='{name}'.*nothing"):
            getattr(out, name)
    out = model(tokens, padding, capture="head_out")
    assert len(out.head_out) == 2
    with pytest.raises(NotCapturedError, match=r"'attn' was not captured.*\['head_out'\]"):
        out.attn


def test_bad_inputs_get_clear_errors():
    model = model_for(make_cfg(max_len=16))
    tokens, padding = batch(B=3, T=10)
    cases = [
        ((tokens.float(), padding), r"tokens must be a \(batch, length\) int64 \(or int32\) tensor.*torch.float32"),
        ((tokens[0], padding[0]), r"tokens must be a \(batch, length\)"),
        ((tokens, padding.long()), r"padding_mask must be a bool tensor shaped like tokens \(3, 10\).*torch.int64"),
        ((tokens, padding[:, :9]), r"padding_mask must be a bool tensor.*\(3, 9\)"),
        ((torch.full((3, 10), V), padding), rf"token ids must be in \[0, vocab_size={V}\), got min {V}, max {V}"),
        ((tokens, padding.index_fill(1, torch.tensor([0]), True)), r"padding_mask is True at position 0 \(the CLS token"),
        ((torch.zeros(3, 17, dtype=torch.long), None), r"input length 17 exceeds max_len=16"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            model(*args)
    mean_model = model_for(make_cfg(readout="mean"))
    with pytest.raises(ValueError, match=r"padding_mask is True at every position in rows \[1\]"):
        mean_model(tokens, padding.index_fill(0, torch.tensor([1]), True))
    assert model(tokens.int(), padding).logits.shape == (3, C)  # int32 ids are fine
    assert model(tokens).logits.shape == (3, C)  # no mask = no padding


def test_captured_attention_is_float32_under_bf16_autocast():
    model = model_for(make_cfg()).train()
    tokens, padding = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(tokens, padding, capture=True)
        out.logits.float().sum().backward()
    assert out.attn[0].dtype == torch.float32
    rows_sum_to_one(out.attn[0])
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


# ---------------------------------------------------------------- rotary positions and sentence-local layers


def test_rope_scores_depend_only_on_relative_offsets():
    from disentangle.model import apply_rope, rope_tables

    cos, sin = rope_tables(40, 8)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, 8, generator=g), torch.randn(1, 1, 1, 8, generator=g)
    def score(i, j):
        return (apply_rope(q, cos[i], sin[i]) * apply_rope(k, cos[j], sin[j])).sum().item()
    # The tables' angles i·θ are rounded with an error ≲ i·eps (i ≤ 24), then a dot product over 8 dims.
    qk = (q.norm() * k.norm()).item()
    assert score(3, 7) == pytest.approx(score(20, 24), abs=tol(8 + 2 * 24, qk))
    assert score(3, 7) != pytest.approx(score(3, 9), abs=1e-3)
    # a rotation: norms are unchanged (angle 11·θ, a 2-term rotation, a norm over 8 dims)
    assert apply_rope(q, cos[11], sin[11]).norm().item() == pytest.approx(q.norm().item(), rel=tol(11 + 2 + 8))


def segmented_batch():
    """Two sentences and a question segment (0) per row; row 1 has padding."""
    tokens, padding = batch(B=2, T=10)
    segments = torch.tensor([[0, 1, 1, 1, 2, 2, 2, 0, 0, 0], [0, 1, 1, 2, 2, 0, 0, 0, 0, 0]])
    padding = torch.tensor([[False] * 10, [False] * 7 + [True] * 3])
    return tokens.masked_fill(padding, 0), padding, segments


def test_local_layer_attends_only_within_its_segment_and_global_layers_everywhere():
    cfg = make_cfg(n_layers=3, local_layers=1)
    model = model_for(cfg)
    tokens, padding, segments = segmented_batch()
    out = model(tokens, padding, capture="attn", segments=segments)
    local, glob = out.attn[0], out.attn[1]  # (B, H, T, T)
    other = segments[:, :, None] != segments[:, None, :]
    blocked = (other | padding[:, None, :])[:, None].expand_as(local)
    assert torch.all(local[blocked] == 0)
    rows_sum_to_one(local)
    assert torch.all(glob[:, :, :, :7] > 0)  # real keys of both rows get weight in a global layer
    assert torch.all(glob[1, :, :, 7:] == 0)


def test_local_layers_explicit_and_fused_paths_agree():
    model = model_for(make_cfg(n_layers=2, local_layers=1))
    tokens, padding, segments = segmented_batch()
    fused = model(tokens, padding, segments=segments).logits
    explicit = model(tokens, padding, capture="attn", segments=segments).logits
    assert_close(fused, explicit, chain(model.cfg, 10))


def test_local_layers_need_segments_and_at_least_one_global_layer():
    model = model_for(make_cfg(n_layers=2, local_layers=1))
    tokens, padding, _ = segmented_batch()
    with pytest.raises(ValueError, match=r"local_layers=1 needs segments shaped like tokens"):
        model(tokens, padding)
    with pytest.raises(ConfigError, match=r"local_layers=2 must be in \[0, n_layers=2\)"):
        make_cfg(n_layers=2, local_layers=2)


def test_a_token_in_another_sentence_cannot_change_a_local_layers_output():
    """Changing a token of sentence 2 leaves the local layer's outputs on sentence 1 untouched."""
    model = model_for(make_cfg(n_layers=2, local_layers=1))
    tokens, padding, segments = segmented_batch()
    changed = tokens.clone()
    changed[0, 5] = (changed[0, 5] % (V - 1)) + 1
    a = model(tokens, padding, capture="head_out", segments=segments).head_out[0]
    b = model(changed, padding, capture="head_out", segments=segments).head_out[0]
    torch.testing.assert_close(a[0, :, 1:4], b[0, :, 1:4])
    assert not torch.allclose(a[0, :, 4:7], b[0, :, 4:7])


# ---------------------------------------------------------------- sparse attention by construction (entmax)


@pytest.mark.parametrize("attention", ["entmax15", "entmax_alpha"])
def test_entmax_attention_rows_sum_to_one_with_exact_zeros_in_the_global_layers_only(attention):
    from entmax import entmax15, entmax_bisect

    cfg = make_cfg(n_layers=2, local_layers=1, attention=attention, pos_encoding="learned")
    model = model_for(cfg)
    with torch.no_grad():  # spread the scores, so that entmax has real keys to set to 0
        model.blocks[1].attn.W_Q.mul_(30.0)
        model.blocks[1].attn.W_K.mul_(30.0)
    tokens, padding, segments = segmented_batch()
    seen = {}
    model.blocks[1].attn.register_forward_hook(lambda m, args, out: seen.update(x=args[0]))
    out = model(tokens, padding, capture="attn", segments=segments)
    local, glob = out.attn
    rows_sum_to_one(glob)
    assert torch.all(glob[padding[:, None, None, :].expand_as(glob)] == 0)  # padded keys: exactly 0
    real_pairs = ~padding[:, None, None, :].expand_as(glob) & ~padding[:, None, :, None].expand_as(glob)
    assert (glob[real_pairs] == 0).any()  # exact zeros on real keys too: sparse by construction
    assert (local[~padding[:, None, None, :].expand_as(local) & (local > 0)]).numel() > 0  # the local layer: softmax
    # The library's function of this head's scores (reference: q kᵀ / √d_head, as in the softmax test above).
    attn, x, h = model.blocks[1].attn, seen["x"], 2
    b = attn.b_QKV.view(3, cfg.n_heads, cfg.d_head)
    q, k = x @ attn.W_Q[h] + b[0, h], x @ attn.W_K[h] + b[1, h]
    scores = ((q @ k.transpose(1, 2)) / math.sqrt(cfg.d_head)).masked_fill(padding[:, None, :], -1e4)
    expected = entmax15(scores, dim=-1) if attention == "entmax15" else entmax_bisect(scores, attn.alpha[h], dim=-1)
    n = cfg.d_model + cfg.d_head + 2 * tokens.shape[1]
    assert_close(glob[:, h], expected.masked_fill(padding[:, None, :], 0.0), n)


@pytest.mark.parametrize("attention", ["entmax15", "entmax_alpha"])
def test_entmax_of_a_diverged_model_is_nan_not_a_crash(attention):
    """A diverged run's weights are NaN: entmax15's threshold search then indexes out of bounds. The model
    must return NaN (the training loop records the run as diverged) and leave healthy rows alone."""
    cfg = make_cfg(n_layers=2, local_layers=1, attention=attention, pos_encoding="learned")
    model = model_for(cfg)
    tokens, padding, segments = segmented_batch()
    healthy = model(tokens, padding, capture="attn", segments=segments).attn[1]
    with torch.no_grad():
        model.blocks[1].attn.W_Q[0, 0, 0] = math.nan  # head 0 only: its scores turn NaN, the other heads' do not
    out = model(tokens, padding, capture="attn", segments=segments)
    glob = out.attn[1]  # (B, H, T, T)
    assert torch.isnan(glob[:, 0]).all() and torch.isnan(out.logits).all()
    assert torch.equal(glob[:, 1:], healthy[:, 1:])


def test_learned_alpha_gets_a_gradient_and_bad_attention_is_named():
    torch.manual_seed(0)
    model = Encoder(make_cfg(attention="entmax_alpha")).train()  # alpha_logit starts at 0: alpha 1.5
    tokens, padding = batch()
    F.cross_entropy(model(tokens, padding).logits, torch.arange(5) % C).backward()
    for block in model.blocks:
        assert block.attn.alpha_logit.grad is not None and torch.isfinite(block.attn.alpha_logit.grad).all()
        torch.testing.assert_close(block.attn.alpha, torch.full((4,), 1.5))
    assert model_for(make_cfg()).blocks[0].attn.alpha is None
    with pytest.raises(ConfigError, match=r"attention='sparsemax' is not one of \['softmax', 'entmax15', 'entmax_alpha'\]"):
        make_cfg(attention="sparsemax")


# ---------------------------------------------------------------- routed heads (MoH)


def test_router_top_k_renormalised_times_k_shared_mix_and_load_balance_by_hand():
    from disentangle.model import Attention

    cfg = ModelConfig(vocab_size=V, n_classes=C, d_model=4, n_heads=4, n_layers=1, d_ff=8, local_layers=0, pos_encoding="learned",
                      routed_top_k=2, shared_heads=1)
    attn = Attention(cfg)
    with torch.no_grad():  # x = e_0: the router's logits are row 0 of W_route (3 routed heads), the mix's row 0 of W_mix
        attn.W_route.zero_()
        attn.W_route[0] = torch.tensor([math.log(4.0), math.log(2.0), 0.0])  # probs 4/7, 2/7, 1/7
        attn.W_mix.zero_()  # a1 = a2 = 1
    x = torch.zeros(1, 2, 4)
    x[0, :, 0] = 1.0
    gates, balance = attn.route(x, torch.zeros(1, 2, dtype=torch.bool))
    # shared head 0: gate 1 (h_s = 1) x a1; routed: top-2 of (4/7, 2/7, 1/7) renormalised (2/3, 1/3) x k = 2, x a2
    torch.testing.assert_close(gates[0, 0], torch.tensor([1.0, 4 / 3, 2 / 3, 0.0]))
    # E Σ P f with P = (4/7, 2/7, 1/7), f = (1, 1, 0): 3 · 6/7
    assert balance.item() == pytest.approx(3 * 6 / 7, abs=tol(3 + 2))


def test_routed_heads_zero_the_unchosen_heads_and_train_the_router():
    cfg = make_cfg(n_layers=2, routed_top_k=2, shared_heads=1, pos_encoding="learned")
    model = model_for(cfg).train()
    tokens, padding = batch()
    out = model(tokens, padding, capture=("head_out", "gates"))
    for z, g in zip(out.head_out, out.gates):  # (B, H, T, dh), (B, H, T)
        real = ~padding[:, None, :].expand_as(g)
        assert ((g[:, 1:] > 0).sum(1)[~padding] == 2).all()  # exactly k routed heads on at every real token
        assert torch.all(z[(g == 0) & real] == 0)  # an unchosen head writes nothing
    assert set(out.aux) == {"load_balance"}
    (F.cross_entropy(out.logits, torch.arange(5) % C) + out.aux["load_balance"]).backward()
    assert model.blocks[0].attn.W_route.grad.abs().sum() > 0 and model.blocks[0].attn.W_mix.grad.abs().sum() > 0
    plain = model_for(make_cfg())(tokens, padding, capture="gates")
    assert plain.aux == {} and all(torch.all(g == 1) for g in plain.gates)  # multi-head attention: every gate 1


@pytest.mark.parametrize("kw, message", [
    (dict(routed_top_k=5), r"routed_top_k=5 must be <= the routed heads, n_heads - shared_heads = 4"),
    (dict(routed_top_k=1, shared_heads=4), r"shared_heads=4 must be in \[0, n_heads=4\)"),
    (dict(shared_heads=1), r"shared_heads=1 needs routing: set routed_top_k >= 1"),
    (dict(routed_top_k=-1), r"routed_top_k=-1 must be >= 0"),
])
def test_bad_routing_is_named(kw, message):
    with pytest.raises(ConfigError, match=message):
        make_cfg(**kw)


# ---------------------------------------------------------------- Hopfield memory


def test_one_hopfield_update_by_hand_and_its_fixed_point():
    from disentangle.model import HopfieldMemory, attractors

    d, M = 4, 3
    cfg = make_cfg(d_model=d, n_heads=2, hopfield_patterns=M, hopfield_beta=0.5, hopfield_steps=1, pos_encoding="learned")
    memory = HopfieldMemory(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        memory.patterns.copy_(torch.randn(M, d, generator=g))
        memory.out.weight.copy_(torch.eye(d))
        memory.out.bias.zero_()
    x = torch.randn(1, 2, d, generator=g)
    X = F.layer_norm(memory.patterns, (d,))
    xi = F.layer_norm(x, (d,))  # memory.ln starts as the identity affine
    expected = torch.softmax(0.5 * xi @ X.T, -1) @ X  # xi <- X^T softmax(beta X xi), once
    out, p = memory(x)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(p, torch.softmax(0.5 * expected @ X.T, -1))
    # Large beta, many steps: the state converges to a fixed point, the stored pattern nearest it.
    memory.beta, memory.steps, memory.tol = 50.0, 50, 1e-6
    out, p = memory(x)
    again = torch.softmax(50.0 * out @ X.T, -1) @ X
    torch.testing.assert_close(again, out, atol=tol(M + d, magnitude=2.0), rtol=0)
    assert torch.equal(attractors(p), (xi @ X.T).argmax(-1))  # each token: the pattern it started nearest to
    assert torch.all(attractors(torch.full((1, 2, M), 1.0 / M)) == -1)  # no pattern dominates: metastable


def test_hopfield_blocks_capture_attractors_train_the_patterns_and_bad_settings_are_named():
    cfg = make_cfg(n_layers=2, local_layers=1, hopfield_patterns=8)
    model = model_for(cfg).train()
    tokens, padding, segments = segmented_batch()
    out = model(tokens, padding, capture="attractors", segments=segments)
    assert torch.all(out.attractors[0] == -2)  # the sentence-local layer has no memory
    assert out.attractors[1].shape == tokens.shape and out.attractors[1].min() >= -1 and out.attractors[1].max() < 8
    F.cross_entropy(out.logits, torch.arange(2) % C).backward()
    assert model.blocks[1].memory.patterns.grad.abs().sum() > 0 and model.blocks[0].memory is None
    for kw, message in [(dict(hopfield_beta=0.0), r"hopfield_beta=0.0 must be > 0"),
                        (dict(hopfield_patterns=-1), r"hopfield_patterns=-1 must be >= 0"),
                        (dict(hopfield_steps=0), r"hopfield_steps=0 must be > 0")]:
        with pytest.raises(ConfigError, match=message):
            make_cfg(**{"hopfield_patterns": 8, **kw})


# ---------------------------------------------------------------- every architectural arm: gradients and settings


@pytest.mark.parametrize("kw, own", [
    (dict(routed_top_k=2, shared_heads=2), ("W_route", "W_shared", "W_mix")),
    (dict(routed_top_k=1), ("W_route",)),
    (dict(hopfield_patterns=6, hopfield_beta=2.0), ("memory.patterns", "memory.out.weight")),
    (dict(attention="entmax15"), ()),
    (dict(attention="entmax_alpha", entmax_alpha=1.25), ("alpha_logit",)),
], ids=["routed-shared", "routed-k1", "hopfield", "entmax15", "entmax-alpha"])
def test_every_parameter_of_every_arm_gets_a_finite_gradient(kw, own):
    model = model_for(make_cfg(pos_encoding="learned", **kw)).train()
    tokens, padding = batch(B=6, T=12)
    out = model(tokens, padding)
    loss = F.cross_entropy(out.logits, torch.arange(6) % C) + sum(out.aux.values())
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    for suffix in own:  # the arm's own parameters learn, in every layer that has them
        grads = [p.grad for name, p in model.named_parameters() if name.endswith(suffix)]
        assert grads and all(g.abs().sum() > 0 for g in grads), suffix


def test_learned_alpha_starts_where_asked_and_alpha_outside_one_two_is_named():
    model = Encoder(make_cfg(attention="entmax_alpha", entmax_alpha=1.25))
    for block in model.blocks:
        torch.testing.assert_close(block.attn.alpha, torch.full((4,), 1.25))
    torch.manual_seed(0)
    default = Encoder(make_cfg(attention="entmax_alpha"))
    assert all(torch.equal(b.attn.alpha_logit, torch.zeros(4)) for b in default.blocks)  # 1.5: logit exactly 0
    for alpha in (1.0, 0.5, 2.0):
        with pytest.raises(ConfigError, match=rf"entmax_alpha={alpha} must be in \(1, 2\)"):
            make_cfg(attention="entmax_alpha", entmax_alpha=alpha)


@pytest.mark.parametrize("kw, message", [
    (dict(routed_top_k=9), r"routed_top_k=9 must be <= the routed heads, n_heads - shared_heads = 4"),  # k > heads
    (dict(hopfield_patterns=4, hopfield_beta=-1.0), r"hopfield_beta=-1.0 must be > 0"),  # beta <= 0
    (dict(hopfield_patterns=-3), r"hopfield_patterns=-3 must be >= 0"),  # M < 1 (0 = no memory)
    (dict(hopfield_patterns=4, hopfield_tol=0.0), r"hopfield_tol=0.0 must be > 0"),
    (dict(routing_balance=-0.01), r"routing_balance=-0.01 must be >= 0"),
])
def test_bad_arm_settings_name_the_field(kw, message):
    with pytest.raises(ConfigError, match=message):
        make_cfg(**kw)
