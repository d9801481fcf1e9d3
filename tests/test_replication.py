"""The replication's building blocks (section 10): the published input format, encoder and optimiser options,
the configurations as published, the prediction interval and the verdict rows. Tiny and deterministic."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

from disentangle import replication as rep
from disentangle.config import ConfigError, DataConfig, RunConfig, TrainConfig, run_hash
from disentangle.data.core import SEP, SSEP, Story, Vocab, encode_published
from disentangle.model import Encoder, ModelConfig
from disentangle.train import _batch_indices, _optimizer
from disentangle.verdicts import replication as rv

TINY = ModelConfig(vocab_size=12, n_classes=3, d_model=8, n_heads=2, n_layers=2, local_layers=0, d_ff=16,
                   pos_encoding="sinusoidal", readout="mean")


def test_new_fields_at_their_defaults_leave_the_run_hash_alone_and_bad_values_are_named():
    base = RunConfig()
    assert run_hash(base) == "87cc305985f7c0a2"  # pinned in test_arms too
    for dotted in ("model.no_bias", "model.scale_embeddings", "data.babi_format", "data.babi_max_tokens",
                   "train.weight_decay_on", "train.batch_order", "train.adam_beta2"):
        group, name = dotted.split(".")
        assert name not in base.hash_dict()[group]
    assert run_hash(base.replace(**{"train.batch_order": "epochs"})) != run_hash(base)
    with pytest.raises(ConfigError) as err:
        RunConfig.from_dict({"model": {"no_bias": "ffn"}, "train": {"weight_decay_on": "some", "batch_order": "x", "adam_beta2": 1.0},
                             "data": {"source": "babi", "tasks": ["qa1"], "babi_dir": "x", "babi_format": "theirs"}})
    text = str(err.value)
    for expected in ("no_bias='ffn' is not one of ['all', 'attention']", "weight_decay_on='some'", "batch_order='x'",
                     "adam_beta2=1.0 must be in (0, 1)", "babi_format='theirs' is not one of ['project', 'published']"):
        assert expected in text, expected
    with pytest.raises(ConfigError, match="early_stopping=3 needs a validation split"):
        RunConfig.from_dict({"data": {"source": "babi", "tasks": ["qa1"], "babi_dir": "x", "n_val": 0},
                             "train": {"early_stopping": 3}})


def test_scale_embeddings_multiplies_token_embeddings_by_sqrt_d_model():
    torch.manual_seed(0)
    plain = Encoder(TINY).eval()
    scaled = Encoder(TINY.replace(scale_embeddings=True)).eval()
    scaled.load_state_dict(plain.state_dict())
    tokens = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        scaled.tok_emb.weight.copy_(plain.tok_emb.weight)
        plain.tok_emb.weight.mul_(math.sqrt(TINY.d_model))  # the same model with sqrt(d)-times larger embeddings
    torch.testing.assert_close(scaled(tokens).logits, plain(tokens).logits, rtol=0, atol=1e-6)


def test_no_bias_attention_strips_only_the_attention_projections():
    names = lambda cfg: {n for n, _ in Encoder(cfg).named_parameters() if n.endswith(("b_QKV", "b_O", "ff_in.bias", "ff_out.bias"))}  # noqa: E731
    assert names(TINY.replace(bias=False)) == set()
    assert names(TINY.replace(bias=False, no_bias="attention")) == {f"blocks.{i}.{f}.bias" for i in (0, 1) for f in ("ff_in", "ff_out")}
    assert len(names(TINY)) == 8  # bias=True: every one, whatever no_bias says


def test_published_layout_separators_and_the_last_tokens():
    vocab = Vocab(["mary", "went", "home", ".", "where", "is", "?", SSEP])
    story = Story((("mary", "went", "home", "."), ("mary", "went", "home", ".")), ("where", "is", "mary", "?"), "home", "qa1", (1,))
    answers = Vocab(["home"], specials=())
    e = encode_published(story, vocab, answers, max_tokens=180)
    assert vocab.decode(e.tokens) == ["mary", "went", "home", ".", SSEP] * 2 + [SEP, "where", "is", "mary", "?"]
    assert e.sentence_ids == (0, 0, 0, 0, -1, 1, 1, 1, 1, -1, -1, -1, -1, -1, -1)
    assert e.support_mask == tuple(s == 1 for s in e.sentence_ids) and sum(e.question_mask) == 4
    cut = encode_published(story, vocab, answers, max_tokens=8)  # the LAST 8 tokens: the tail of sentence 1 stays
    assert vocab.decode(cut.tokens) == ["home", ".", SSEP, SEP, "where", "is", "mary", "?"] and cut.supporting == (1,)
    gone = encode_published(story, vocab, answers, max_tokens=5)  # the supporting sentence is cut off: dropped
    assert gone.supporting == () and not any(gone.support_mask)


def test_epoch_batches_are_a_permutation_per_epoch_with_a_partial_last_batch():
    n, bs = 10, 4  # ceil(10 / 4) = 3 batches an epoch: 4, 4, 2
    epoch0 = [_batch_indices(s, n, bs, seed=7, order="epochs") for s in range(3)]
    assert [len(b) for b in epoch0] == [4, 4, 2] and sorted(torch.cat(epoch0).tolist()) == list(range(n))
    epoch1 = torch.cat([_batch_indices(s, n, bs, seed=7, order="epochs") for s in range(3, 6)])
    assert sorted(epoch1.tolist()) == list(range(n)) and not torch.equal(epoch1, torch.cat(epoch0))  # reshuffled
    assert torch.equal(_batch_indices(4, n, bs, 7, "epochs"), _batch_indices(4, n, bs, 7, "epochs"))  # a pure function
    assert len(_batch_indices(2, n, bs, 7)) == bs  # iid: always full batches, as before


def test_weight_decay_on_all_decays_every_parameter():
    model = Encoder(TINY)
    matrices = _optimizer(model, TrainConfig())
    every = _optimizer(model, TrainConfig(weight_decay_on="all", adam_beta2=0.999))
    n = len(list(model.parameters()))
    assert len(matrices.param_groups[0]["params"]) < n and len(every.param_groups[0]["params"]) == n
    assert every.param_groups[0]["weight_decay"] == 0.01 and every.param_groups[0]["betas"] == (0.9, 0.999)


def test_the_published_configurations():
    cfg = rep.config("ortho_mi_attn_head", "/data/en")
    m, d, t, c = cfg.model, cfg.data, cfg.train, cfg.constraints
    assert (m.d_model, m.n_heads, m.n_layers, m.d_ff, m.local_layers, m.dropout) == (128, 8, 2, 256, 0, 0.1)
    assert (m.pos_encoding, m.readout, m.bias, m.no_bias, m.scale_embeddings) == ("sinusoidal", "mean", False, "attention", True)
    assert (d.babi_format, d.babi_max_tokens, d.babi_max_sentences, d.n_val, d.n_train, d.n_test) == ("published", 180, 50, 0, 0, 0)
    assert t.steps == 128 and t.eval_every == 16 and (t.lr, t.weight_decay, t.weight_decay_on, t.grad_clip) == (3e-4, 0.01, "all", 1.0)
    assert t.lr * t.min_lr_ratio == t.lr and t.warmup_steps == 0 and t.batch_order == "epochs" and t.early_stopping == 0
    assert c.layers == (1,) and c.active() == {"orthogonality": 0.1, "mutual_information": 0.05, "attention_entropy": 0.02, "head_usage": 0.02}
    assert {c.orthogonality_variant, c.mi_variant, c.attention_entropy_variant, c.head_usage_variant} == {"published"}
    assert rep.config("ortho_mi_attn_head_lrg_3", "x").train.steps == 256 and rep.config("vanilla_lrg_1", "x").constraints.layers == (2,)
    assert rep.config("vanilla", "x").constraints.active() == {}
    project = rep.config("mi_project", "x").constraints
    assert project.active() == {"mutual_information": 0.05} and project.mi_variant == "infonce"
    conv = rep.config("vanilla", "x", protocol="converged", val=100, max_epochs=50, patience=7).train
    assert (conv.steps, conv.eval_every, conv.early_stopping) == (50 * 15, 15, 7)  # 900 questions: 15 batches an epoch
    assert conv.min_steps == 8 * 15 and t.min_steps == 0  # never stopped before the published 8 epochs
    assert rep.config("ortho_mi_attn_head_lrg_3", "x", protocol="converged").train.min_steps == 16 * 15
    short = rep.config("vanilla", "x", protocol="converged", epochs=1, max_epochs=2).train  # the quick profile
    assert (short.min_steps, short.steps) == (15, 30)
    assert rep.config("vanilla", "x", protocol="converged").data.n_val == 100


def test_prediction_interval_is_wider_than_the_mean_interval_by_sqrt_n_plus_one():
    x = [0.30, 0.34, 0.38, 0.42]
    lo, hi = rep.prediction_interval(x)
    from disentangle.stats import mean_ci

    _, clo, chi = mean_ci(x)
    assert (hi - lo) / (chi - clo) == pytest.approx(math.sqrt(len(x) + 1))
    assert math.isnan(rep.prediction_interval([0.3])[0])


def _runs(acc: dict[tuple[str, str], list[float]]) -> pd.DataFrame:
    return pd.DataFrame([{"name": n, "protocol": p, "seed": s, "test_acc": a, "epochs": 8.0}
                         for (p, n), values in acc.items() for s, a in enumerate(values)])


def test_contrasts_and_verdicts_from_known_numbers():
    runs = _runs({("published", "vanilla"): [0.36, 0.38, 0.37], ("published", "ortho_mi"): [0.36, 0.38, 0.37],
                  ("converged", "vanilla"): [0.50, 0.52, 0.54], ("converged", "ortho_mi"): [0.40, 0.43, 0.45]})
    diffs = rep.contrasts(runs)
    pub = diffs[diffs["protocol"] == "published"].iloc[0]
    assert pub["effect"] == pytest.approx(0.0) and pub["published"] == pytest.approx(0.005) and pub["how"] == "paired over 3 seeds"
    conv = diffs[diffs["protocol"] == "converged"].iloc[0]
    assert conv["effect"] == pytest.approx(-0.28 / 3)  # (0.40 + 0.43 + 0.45 - 0.50 - 0.52 - 0.54) / 3
    rows = rv.difference_rows(diffs, margin=0.01)
    assert [r["verdict"] for r in rows] == ["not supported", "not supported"]  # zero spread inside the margin; the other sign
    table = rep.table(runs)
    inside = rv.published_inside_rows(table)
    assert [r["verdict"] for r in inside] == ["supported", "not supported"]  # 0.370 and 0.375 inside as published, not trained
    survival = rv.survival(diffs)
    assert survival.iloc[0]["published verdict"] == "not supported"


def test_mi_rows_need_both_estimators_to_agree():
    models = pd.DataFrame([{"name": n, "protocol": "published", "seed": s, "infonce": v + 0.01 * s, "club": c + 0.01 * s}
                           for s in range(3) for n, v, c in (("vanilla", 0.5, 1.0), ("mi_published", 0.9, 1.6), ("mi_project", 0.2, 0.99))])
    rows = rv.mi_rows(models, margin=0.02)
    assert rows[0]["verdict"] == "not supported" and rows[0]["effect"] == pytest.approx(0.4)  # the published term raises MI
    assert rows[1]["verdict"] == "not supported"  # InfoNCE lower by 0.3, but CLUB only by 0.01: within the margin
    assert np.isnan(rv.mi_rows(models[models["name"] != "mi_project"], 0.02)[1]["effect"])  # untestable without the arm
