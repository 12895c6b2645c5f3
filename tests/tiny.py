"""Tiny random models built from configs (never downloaded), one per layer layout."""

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    LlamaConfig,
    OPTConfig,
)

VOCAB = 128


def tiny_config(kind: str, vocab: int = VOCAB):
    if kind == "llama":
        return LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    if kind == "llama-wide":  # rows of 256 and 512 weights: llama.cpp's K-quants fit
        return LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    if kind == "opt":
        return OPTConfig(vocab_size=vocab, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                         word_embed_proj_dim=64, max_position_embeddings=512)
    if kind == "gpt2":
        return GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=512)
    if kind == "gemma3":
        return Gemma3TextConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                max_position_embeddings=512, sliding_window=32, final_logit_softcapping=30.0)
    raise ValueError(kind)


def tiny_model(kind: str = "llama", seed: int = 0, vocab: int = VOCAB):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(kind, vocab), dtype=torch.float32)
    # random init is near-uniform; sharpen so perplexities differ across inputs
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(3.0)
    return model.eval()


def token_stream(n: int = 4096, vocab: int = VOCAB, seed: int = 0) -> torch.Tensor:
    """A stream with structure (a noisy repeating pattern) so models can differ on it."""
    g = torch.Generator().manual_seed(seed)
    base = torch.arange(n) % 17 * 7 % vocab
    noise = torch.randint(0, vocab, (n,), generator=g)
    keep = torch.rand(n, generator=g) < 0.7
    return torch.where(keep, base, noise)


def check_reads_everywhere(folder, model, n_layers: int) -> float:
    """A quantized checkpoint in ``folder``, read as ``model`` (``gs.load_quantized``), reads the
    same through ``gs.load_model`` (every command's ``--model``) and scores the same block by block
    from disk; returns its perplexity on a tiny token stream."""
    import math

    import pytest

    import gransearch as gs

    ids = token_stream(1024, vocab=model.config.vocab_size, seed=3)
    ppl = gs.perplexity(model, ids, seqlen=64, batch_size=2, verbose=False).ppl
    assert math.isfinite(ppl)
    loaded, _ = gs.load_model(str(folder))
    assert sum(isinstance(m, gs.QuantLinear) for m in loaded.modules()) == n_layers
    disk = gs.offload.DiskModel(str(folder))
    assert len(disk.quantized) == n_layers
    assert gs.offload.perplexity(disk, ids, seqlen=64, batch_size=2, verbose=False).ppl == pytest.approx(ppl, rel=1e-5)
    return ppl
