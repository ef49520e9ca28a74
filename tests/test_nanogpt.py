"""nanoGPT (Karpathy's model.py, written out compactly): position ids torch.arange(T),
`B, T, C = x.size()` views, F.scaled_dot_product_attention, the token embedding tied to
the LM head. Fused at every T — T a multiple of the K·B rows included — and equal to the
one-point-at-a-time oracle, through `interpolate` and `evaluate`."""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mlifast
from oracle import oracle_outputs, rel_err


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd, n_head):
        super().__init__()
        self.c_attn, self.c_proj, self.n_head = nn.Linear(n_embd, 3 * n_embd), nn.Linear(n_embd, n_embd), n_head

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class Block(nn.Module):
    def __init__(self, n_embd, n_head):
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(n_embd), CausalSelfAttention(n_embd, n_head)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, vocab=32, block_size=16, n_layer=2, n_head=2, n_embd=8):
        super().__init__()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(vocab, n_embd), wpe=nn.Embedding(block_size, n_embd),
            h=nn.ModuleList([Block(n_embd, n_head) for _ in range(n_layer)]), ln_f=nn.LayerNorm(n_embd)))
        self.lm_head = nn.Linear(n_embd, vocab, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * n_layer))

    def forward(self, idx):
        b, t = idx.size()
        pos = torch.arange(0, t, dtype=torch.long, device=idx.device)  # shape (t)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))


def pair():
    torch.manual_seed(0)
    return GPT().double().eval(), GPT().double().eval()


@pytest.mark.parametrize("sequences, tokens, points", [(2, 8, 4), (2, 16, 4), (3, 5, 4), (1, 8, 8)],
                         ids=["T=K·B", "T=2·K·B", "T unrelated", "one sequence"])
def test_nanogpt_stays_fused_and_matches_the_oracle(sequences, tokens, points):
    a, b = pair()
    line, coords = mlifast.Line(a, b), torch.linspace(-0.5, 1.5, points)
    idx = torch.randint(0, 32, (sequences, tokens), generator=torch.Generator().manual_seed(1))
    fast = mlifast.interpolate(a, line, coords)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning
        out = fast(idx)
    assert not fast.per_point_fallback
    for k, e in enumerate(oracle_outputs(a, line, coords, idx)):
        assert rel_err(out[k], e) < 1e-9, k


def test_nanogpt_loss_along_a_line():
    a, b = pair()
    line = mlifast.Line(a, b)
    g = torch.Generator().manual_seed(2)
    data = [(x[:, :-1], x[:, 1:]) for x in (torch.randint(0, 32, (2, 9), generator=g) for _ in range(3))]

    def token_loss(logits, target, reduction="none"):
        return F.cross_entropy(logits.transpose(1, 2), target, reduction=reduction).mean(1)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = mlifast.evaluate(a, line, data, coords=torch.tensor([0.0, 0.25, 0.5, 1.0]), loss=token_loss, metrics=(), progress=False)
    for k, alpha in enumerate(res.alphas.tolist()):
        per_batch = [token_loss(o[0], y).mean() for (x, y), o in
                     ((batch, oracle_outputs(a, line, torch.tensor([alpha]), batch[0])) for batch in data)]
        assert abs(res["loss"][k].item() - torch.stack(per_batch).mean().item()) < 1e-9
