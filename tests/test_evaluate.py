"""Perplexity protocol against transformers' own loss; chunked loss equals unchunked."""

import math

import pytest
import torch

import gransearch as gs
from gransearch.evaluate import chunked_nll, windows

from .tiny import VOCAB, tiny_model, token_stream


@pytest.mark.parametrize("kind", ["llama", "opt", "gpt2", "gemma3"])
def test_perplexity_matches_transformers_labels_loss(kind):
    model = tiny_model(kind)
    ids = token_stream(1000)
    seqlen = 64
    res = gs.perplexity(model, ids, seqlen=seqlen, batch_size=3, verbose=False)
    w = windows(ids, seqlen)
    with torch.no_grad():
        losses = [float(model(input_ids=x[None], labels=x[None]).loss) for x in w]
    ref = math.exp(sum(losses) / len(losses))
    assert res.n_windows == 1000 // seqlen == len(losses)
    assert res.n_tokens == len(losses) * (seqlen - 1)
    assert abs(res.ppl - ref) / ref < 1e-4


def test_chunked_loss_equals_unchunked():
    torch.manual_seed(0)
    head = torch.nn.Linear(32, 500, bias=False)
    h = torch.randn(333, 32)
    t = torch.randint(0, 500, (333,))
    full = torch.nn.functional.cross_entropy(head(h), t, reduction="sum").double()
    for chunk in (1, 7, 100, 333, 10_000):
        got = chunked_nll(h, t, head, chunk_tokens=chunk)
        assert torch.allclose(got, full, rtol=1e-6), chunk
    # with soft-capping, against the capped logits
    capped = torch.tanh(head(h) / 5.0) * 5.0
    ref = torch.nn.functional.cross_entropy(capped, t, reduction="sum").double()
    assert torch.allclose(chunked_nll(h, t, head, softcap=5.0, chunk_tokens=50), ref, rtol=1e-6)


def test_perplexity_chunking_and_batching_invariant():
    model = tiny_model("llama")
    ids = token_stream(2000)
    a = gs.perplexity(model, ids, seqlen=100, batch_size=1, chunk_tokens=10_000, verbose=False)
    b = gs.perplexity(model, ids, seqlen=100, batch_size=4, chunk_tokens=13, verbose=False)
    assert abs(a.ppl - b.ppl) / a.ppl < 1e-6
    c = gs.perplexity(model, ids, seqlen=100, batch_size=4, chunk_tokens=13, verbose=False)
    assert c.ppl == b.ppl  # deterministic


def test_max_windows_and_errors():
    model = tiny_model("llama")
    ids = token_stream(1000)
    r = gs.perplexity(model, ids, seqlen=100, max_windows=3, verbose=False)
    assert r.n_windows == 3 and r.n_tokens == 3 * 99
    with pytest.raises(ValueError, match="do not fill one window"):
        gs.perplexity(model, ids[:50], seqlen=100, verbose=False)


def test_perplexity_changes_with_model():
    ids = token_stream(1000)
    a = gs.perplexity(tiny_model("llama", seed=0), ids, seqlen=100, verbose=False).ppl
    b = gs.perplexity(tiny_model("llama", seed=1), ids, seqlen=100, verbose=False).ppl
    assert a != b and 1 < a < 10 * VOCAB


def test_kl_divergence_against_the_reference():
    """A model against its own reference diverges by nothing (the reference is kept in float16) and
    predicts the same tokens; a quantized copy diverges, more at fewer bits; the perplexities it
    reports are gs.perplexity's; a reference of other windows is refused."""
    from gransearch.evaluate import kl_divergence, reference_logprobs

    model = tiny_model("llama")
    ids = token_stream(2000, seed=2)
    ref = reference_logprobs(model, ids, seqlen=64, batch_size=3, verbose=False)
    assert ref.shape == (31, 63, VOCAB) and ref.dtype == torch.float16
    same = kl_divergence(model, ids, ref, seqlen=64, batch_size=2, verbose=False)
    assert abs(same.kl) < 1e-4 and same.top1 > 0.99 and same.n_tokens == 31 * 63
    assert math.isclose(same.ppl, gs.perplexity(model, ids, seqlen=64, verbose=False).ppl, rel_tol=1e-5)
    kls = []
    for spec in ("w8c", "w4c", "w2c"):
        q = tiny_model("llama")
        for mod in q.modules():
            if isinstance(mod, torch.nn.Linear) and mod.weight.shape[0] != VOCAB:
                mod.weight.data = gs.rtn(mod.weight.data, gs.QuantSpec.parse(spec)).dequantize()
        r = kl_divergence(q, ids, ref, seqlen=64, batch_size=4, verbose=False)
        assert math.isclose(r.ppl, gs.perplexity(q, ids, seqlen=64, verbose=False).ppl, rel_tol=1e-5)
        assert r.kl_se > 0
        kls.append(r.kl)
    assert abs(same.kl) < kls[0] < kls[1] < kls[2]
    with pytest.raises(ValueError, match="reference_logprobs on the same ids"):
        kl_divergence(model, ids, ref, seqlen=64, max_windows=5, verbose=False)
