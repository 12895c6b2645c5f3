"""Shared fixtures: tiny models saved as real model folders (config, safetensors, tokenizer) and a
local text file, so that the CLI runs end to end in the fast tier without any download."""

import random

import pytest

from .tiny import tiny_model, token_stream

CLI_VOCAB = 260


def calib_windows(n: int = 8, seqlen: int = 32, seed: int = 0, stream_seed=None):
    """``n`` calibration windows of ``seqlen`` tokens from the tiny models' structured token stream."""
    import gransearch as gs

    return gs.sample_windows(token_stream(4096, seed=seed if stream_seed is None else stream_seed), n, seqlen, seed=seed)  # 256 byte tokens and a few spare ids


def _byte_tokenizer():
    """A byte-level tokenizer with no merges: every UTF-8 byte is one token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def save_tiny_model(folder, seed: int = 0, kind: str = "llama") -> str:
    """A tiny random model of ``kind`` with the byte tokenizer, saved as a local model folder."""
    tiny_model(kind, seed=seed, vocab=CLI_VOCAB).save_pretrained(folder)
    _byte_tokenizer().save_pretrained(folder)
    return str(folder)


def write_text(path, n_paragraphs: int = 120, seed: int = 0) -> str:
    """Paragraphs of pseudo-words: enough articles for train, validation and test splits."""
    rng = random.Random(seed)
    words = ["quant", "layer", "group", "scale", "token", "model", "bits", "error", "search", "budget", "plan", "weight"]
    paras = [" ".join(rng.choice(words) for _ in range(60)) + "." for _ in range(n_paragraphs)]
    with open(path, "w") as fh:
        fh.write("\n\n".join(paras))
    return str(path)


@pytest.fixture(scope="session")
def cli_assets(tmp_path_factory):
    """``(model_dir, other_model_dir, text_path)``: two tiny llamas of one architecture (other seeds,
    so other weights) and a local corpus."""
    root = tmp_path_factory.mktemp("cli_assets")
    a = save_tiny_model(root / "model_a", seed=0)
    b = save_tiny_model(root / "model_b", seed=1)
    text = write_text(root / "corpus.txt")
    return a, b, text


@pytest.fixture(scope="session")
def postgres_url():
    """A real PostgreSQL server for this test session (tests/pgserver.py); skipped only where the
    package is missing (scripts/setup.sh, which CI runs, installs it)."""
    from .pgserver import PostgresServer, pg_bindir

    if pg_bindir() is None:
        pytest.skip("PostgreSQL is not installed: run scripts/setup.sh (apt-get install postgresql)")
    pytest.importorskip("psycopg2", reason="needs psycopg2-binary (the dev extra)")
    with PostgresServer() as url:
        yield url
