"""Real Hugging Face model classes (small configs) against the one-point-at-a-time oracle."""
import warnings

import pytest
import torch

import mlifast
from oracle import oracle_outputs, rel_err

transformers = pytest.importorskip("transformers")


def perturbed_pair(factory, seed=0):
    """Two models of one class whose every floating tensor differs (norms included)."""
    torch.manual_seed(seed)
    a = factory().double().eval()
    torch.manual_seed(seed + 1)
    b = factory().double().eval()
    with torch.no_grad():
        for p in b.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return a, b


def gpt2():
    cfg = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                                  attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg)


def bert():
    cfg = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=24, max_position_embeddings=16, num_labels=3,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers.BertForSequenceClassification(cfg)


def inputs(vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (3, 7), generator=g)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 5:] = 0
    return ids, mask


@pytest.mark.parametrize("factory, vocab", [(gpt2, 50), (bert, 40)], ids=["gpt2", "bert"])
def test_parity_with_oracle(factory, vocab):
    a, b = perturbed_pair(factory)
    ids, mask = inputs(vocab)
    line, coords = mlifast.Line(a, b), torch.tensor([-0.5, 0.0, 0.35, 1.0])
    out = mlifast.interpolate(a, line, coords)(input_ids=ids, attention_mask=mask)
    expected = oracle_outputs(a, line, coords, input_ids=ids, attention_mask=mask)
    for k, e in enumerate(expected):
        assert rel_err(out.logits[k], e.logits) < 1e-9, k


def test_a_cache_it_cannot_split_is_said_and_the_logits_are_right():
    a, b = perturbed_pair(gpt2)
    ids, mask = inputs(50)
    line, coords = mlifast.Line(a, b), torch.tensor([0.0, 0.5, 1.0])
    fast = mlifast.interpolate(a, line, coords)
    with pytest.warns(RuntimeWarning, match=r"inside output\['\w+'\] \(DynamicCache\) cannot be read"):
        out = fast(input_ids=ids, attention_mask=mask)
    for k, e in enumerate(oracle_outputs(a, line, coords, input_ids=ids, attention_mask=mask)):
        assert rel_err(out.logits[k], e.logits) < 1e-9, k
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mlifast.interpolate(a, line, coords)(input_ids=ids, attention_mask=mask, use_cache=False)


def test_tied_lm_head_follows_the_embedding():
    a, b = perturbed_pair(gpt2)
    assert a.lm_head.weight is a.transformer.wte.weight
    ids, mask = inputs(50)
    line = mlifast.Line(a, b)
    out = mlifast.interpolate(a, line, torch.tensor([0.5]))(input_ids=ids, attention_mask=mask)
    assert rel_err(out.logits[0], oracle_outputs(a, line, torch.tensor([0.5]), input_ids=ids,
                                                 attention_mask=mask)[0].logits) < 1e-9


def test_loss_computed_inside_forward_is_refused():
    a, b = perturbed_pair(gpt2)
    ids, mask = inputs(50)
    fast = mlifast.interpolate(a, mlifast.Line(a, b), 3)
    with pytest.raises(mlifast.NotPerExampleOutputError, match="output\\['loss'\\]"):
        fast(input_ids=ids, attention_mask=mask, labels=ids)


def test_evaluate_language_model_with_custom_forward():
    a, b = perturbed_pair(gpt2)
    ids, mask = inputs(50)
    data = [{"input_ids": ids[:2], "labels": ids[:2]}, {"input_ids": ids[2:], "labels": ids[2:]}]

    def next_token(model, batch):  # (K, B, T-1, V) logits vs (B, T-1) targets
        return model(input_ids=batch["input_ids"]).logits[:, :, :-1], batch["labels"][:, 1:]

    def token_loss(output, target, reduction="none"):
        return torch.nn.functional.cross_entropy(output.transpose(1, 2), target, reduction=reduction)

    line = mlifast.Line(a, b)
    res = mlifast.evaluate(a, line, data, coords=3, loss=token_loss, metrics=(), forward=next_token, progress=False)
    for k, alpha in enumerate(res.alphas.tolist()):
        m = oracle_outputs(a, line, torch.tensor([alpha]), input_ids=ids)[0].logits[:, :-1]
        per_example = token_loss(m, ids[:, 1:]).mean(1)
        assert abs(res["loss"][k].item() - per_example.mean().item()) < 1e-9


@pytest.mark.parametrize("factory, vocab", [(gpt2, 50), (bert, 40)], ids=["gpt2", "bert"])
def test_position_ids_as_long_as_all_rows_stay_fused(factory, vocab):
    """Position ids of shape (1, T) — broadcast along the batch — are the same for every
    example even when T is a multiple of K·B (here 1 sequence of 8 tokens at 4 and 8 points)."""
    a, b = perturbed_pair(factory)
    ids = torch.randint(1, vocab, (1, 8), generator=torch.Generator().manual_seed(1))
    line = mlifast.Line(a, b)
    for coords in (torch.linspace(0, 1, 4), torch.linspace(-0.5, 1.5, 8)):
        fast = mlifast.interpolate(a, line, coords)
        out = fast(input_ids=ids)
        assert not fast.per_point_fallback
        for k, e in enumerate(oracle_outputs(a, line, coords, input_ids=ids)):
            assert rel_err(out.logits[k], e.logits) < 1e-9, k
