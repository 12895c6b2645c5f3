"""Text corpora at the edge: named samples, hub datasets and local files, split by article.

Names understood by :func:`load_text`:

* ``wiki-sample`` -- the Wikipedia extract shipped in the ``gensim`` wheel
  (``enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2``), main-namespace
  articles only, redirects dropped, wiki markup removed by :func:`clean_wikitext`;
* ``news-sample`` -- ``lee_background.cor`` from the same wheel (300 news articles, one per line);
* ``wikitext2`` and ``c4`` -- through ``datasets`` (needs a reachable hub);
* a path to a local ``.txt`` file -- articles are separated by blank lines.

Splits are deterministic and by article: an article's split is fixed by the CRC32 of its title (or
of its text when it has none): ``crc % 10 == 0`` is *test*, ``== 1`` is *validation*, the rest
*train*. ``wikitext2`` keeps its official splits.
"""

from __future__ import annotations

import bz2
import hashlib
import html
import logging
import os
import re
import xml.etree.ElementTree as ET
import zlib
from functools import lru_cache
from typing import Optional

import torch

log = logging.getLogger(__name__)

__all__ = [
    "SPLITS",
    "TEXT_NAMES",
    "clean_wikitext",
    "load_articles",
    "load_text",
    "load_tokens",
    "sample_windows",
    "split_of",
    "tokens_sha256",
]

SPLITS = ("train", "validation", "test")
TEXT_NAMES = ("wiki-sample", "news-sample", "wikitext2", "c4")
_WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_NEWS_FILE = "lee_background.cor"
# sections after which an article is only references and link lists
_TAIL_SECTIONS = ("references", "external links", "see also", "further reading", "notes", "bibliography", "sources", "footnotes")
_SKIP_LINK_PREFIXES = ("file:", "image:", "category:", "media:", "wikt:", "wiktionary:")


# ---------------------------------------------------------------------------------------------
# wiki markup


def _remove_nested(text: str, open_: str, close: str) -> str:
    """Remove balanced ``open_ ... close`` spans, nested ones included (linear scan)."""
    out = []
    depth = 0
    i = 0
    n = len(text)
    lo, lc = len(open_), len(close)
    start = 0
    while i < n:
        if text.startswith(open_, i):
            if depth == 0:
                out.append(text[start:i])
            depth += 1
            i += lo
        elif depth and text.startswith(close, i):
            depth -= 1
            i += lc
            if depth == 0:
                start = i
        else:
            i += 1
    if depth == 0:
        out.append(text[start:])
    return "".join(out)


_LINK_RE = re.compile(r"\[\[([^\[\]]*)\]\]")
_EXT_LINK_RE = re.compile(r"\[(?:https?|ftp)://[^\s\]]+(?:\s+([^\]]*))?\]")
_REF_RE = re.compile(r"<ref[^>/]*/>|<ref[^>]*>.*?</ref>", re.S | re.I)
_COMMENT_RE = re.compile(r"<!--.*?-->", re.S)
_TAG_BLOCK_RE = re.compile(r"<(gallery|math|timeline|score|imagemap|syntaxhighlight|source)[^>]*>.*?</\1>", re.S | re.I)
_TAG_RE = re.compile(r"</?[a-zA-Z][^>]*>")
_HEADING_RE = re.compile(r"^(={2,6})\s*(.*?)\s*\1\s*$", re.M)
_BOLD_ITALIC_RE = re.compile(r"'{2,5}")


def _replace_link(m: re.Match) -> str:
    inner = m.group(1)
    if inner.lower().startswith(_SKIP_LINK_PREFIXES) or re.match(r"^[a-z]{2,3}(-[a-z]+)?:", inner):
        return ""
    return inner.split("|")[-1]


def clean_wikitext(text: str) -> str:
    """Turn MediaWiki markup into plain paragraphs.

    Drops comments, references, templates (nested), tables, file/category links and the trailing
    reference sections; keeps link labels, external link labels and headings as plain lines.

        >>> clean_wikitext("'''Foo''' is a [[bar|baz]].{{cite web|x=1}}<ref>r</ref>\\n== History ==\\nOld.")
        'Foo is a baz.\\n\\nHistory\\n\\nOld.'
    """
    text = _COMMENT_RE.sub("", text)
    text = _REF_RE.sub("", text)
    text = _TAG_BLOCK_RE.sub("", text)
    text = _remove_nested(text, "{{", "}}")
    text = _remove_nested(text, "{|", "|}")
    # innermost links first, so a file caption's links vanish with the file
    prev = None
    while prev != text:
        prev = text
        text = _LINK_RE.sub(_replace_link, text)
    text = _EXT_LINK_RE.sub(lambda m: m.group(1) or "", text)
    # cut the article at its first reference-like section
    for m in _HEADING_RE.finditer(text):
        if m.group(2).strip().lower() in _TAIL_SECTIONS:
            text = text[: m.start()]
            break
    text = _HEADING_RE.sub(lambda m: "\n" + m.group(2) + "\n", text)
    text = _BOLD_ITALIC_RE.sub("", text)
    text = _TAG_RE.sub("", text)
    text = html.unescape(text).replace("\u00a0", " ")
    lines = []
    for line in text.split("\n"):
        line = line.strip()
        line = re.sub(r"^[*#:;]+\s*", "", line)
        if line.startswith(("|", "!", "__")) or line in ("}}", "{{"):
            continue
        line = re.sub(r"[ \t]+", " ", line)
        line = re.sub(r"\(\s*[,;]?\s*\)", "", line)  # "( )" left by removed templates
        line = re.sub(r" +([,.;:])", r"\1", line)
        lines.append(line.strip())
    text = "\n".join(lines)
    text = re.sub(r"\n{2,}", "\n\n", text)
    paras = [p.strip() for p in text.split("\n\n") if p.strip()]
    return "\n\n".join(paras)


# ---------------------------------------------------------------------------------------------
# sources


def _gensim_data_file(name: str) -> str:
    try:
        import importlib.util

        spec = importlib.util.find_spec("gensim")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the text sample {name!r} ships inside the gensim wheel, which is not installed; "
            "install it with: pip install gensim"
        )
    path = os.path.join(spec.submodule_search_locations[0], "test", "test_data", name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing from the installed gensim; reinstall it with: pip install --force-reinstall gensim")
    return path


@lru_cache(maxsize=4)
def _wiki_articles() -> tuple[tuple[str, str], ...]:
    path = _gensim_data_file(_WIKI_FILE)
    out = []
    with bz2.open(path, "rb") as fh:
        title = ns = None
        for _, elem in ET.iterparse(fh, events=("end",)):
            tag = elem.tag.rsplit("}", 1)[-1]
            if tag == "title":
                title = elem.text or ""
            elif tag == "ns":
                ns = elem.text
            elif tag == "text":
                raw = elem.text or ""
                if ns == "0" and not raw.lstrip().upper().startswith("#REDIRECT"):
                    body = clean_wikitext(raw)
                    if body:
                        out.append((title, body))
            elif tag == "page":
                elem.clear()
    return tuple(out)


@lru_cache(maxsize=4)
def _news_articles() -> tuple[tuple[str, str], ...]:
    path = _gensim_data_file(_NEWS_FILE)
    with open(path, encoding="utf-8", errors="replace") as fh:
        return tuple((f"news-{i}", line.strip()) for i, line in enumerate(fh) if line.strip())


def _txt_articles(path: str) -> tuple[tuple[str, str], ...]:
    with open(path, encoding="utf-8", errors="replace") as fh:
        text = fh.read()
    paras = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    if not paras:
        raise ValueError(f"{path} contains no text")
    return tuple((f"{os.path.basename(path)}#{i}", p) for i, p in enumerate(paras))


def split_of(key: str) -> str:
    """The split an article with this title belongs to (deterministic, stable across runs)."""
    r = zlib.crc32(key.encode("utf-8")) % 10
    return "test" if r == 0 else "validation" if r == 1 else "train"


def _hub_text(name: str, split: str) -> list[str]:
    try:
        from datasets import load_dataset
    except ImportError as exc:  # pragma: no cover - datasets is a dependency
        raise ImportError("loading hub corpora needs `datasets`: pip install datasets") from exc
    try:
        if name == "wikitext2":
            ds = load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
            # the GPTQ protocol joins the raw lines with blank lines
            return ["\n\n".join(ds["text"])]
        # c4: the shards used by GPTQ/AWQ evaluations; train for calibration, validation for eval
        files = {"train": "en/c4-train.00000-of-01024.json.gz", "validation": "en/c4-validation.00000-of-00008.json.gz"}
        hub_split = "train" if split == "train" else "validation"
        ds = load_dataset("allenai/c4", data_files={hub_split: files[hub_split]}, split=hub_split)
        texts = list(ds["text"][:3000])
        if split != "train":  # carve validation/test out of the validation shard, by document
            texts = [t for i, t in enumerate(texts) if (i % 2 == 0) == (split == "validation")]
        return texts
    except Exception as exc:
        raise ConnectionError(
            f"could not load {name!r} from the hub ({type(exc).__name__}: {exc}). Without network "
            "access use the packaged samples ('wiki-sample', 'news-sample') or a local .txt file"
        ) from exc


def check_text_name(name: str) -> None:
    """Raise ``ValueError`` unless ``name`` is a known corpus or an existing file."""
    if name not in TEXT_NAMES and not os.path.isfile(name):
        raise ValueError(f"unknown text {name!r}: use one of {TEXT_NAMES} or a path to a .txt file")


def load_articles(name: str) -> tuple[tuple[str, str], ...]:
    """All ``(title, text)`` articles of a named sample or local ``.txt`` file (no split)."""
    if name == "wiki-sample":
        return _wiki_articles()
    if name == "news-sample":
        return _news_articles()
    check_text_name(name)
    return _txt_articles(name)


def load_text(name: str, split: str = "test") -> list[str]:
    """The articles of ``split`` (``train``, ``validation`` or ``test``) of a corpus, in file order."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if name in ("wikitext2", "c4"):
        return _hub_text(name, split)
    arts = [text for title, text in load_articles(name) if split_of(title) == split]
    if not arts:
        raise ValueError(f"the {split!r} split of {name!r} is empty: the text has too few articles to split")
    return arts


def load_tokens(name: str, tokenizer, split: str = "test", max_tokens: Optional[int] = None) -> torch.Tensor:
    """Token ids ``[N]`` of a split: articles joined by blank lines, tokenized once, no BOS/EOS."""
    texts = load_text(name, split)
    joined = "\n\n".join(texts)
    ids = tokenizer(joined, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    ids = torch.tensor(ids, dtype=torch.long)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if ids.numel() == 0:
        raise ValueError(f"the {split!r} split of {name!r} tokenized to nothing")
    return ids


def tokens_sha256(tokens) -> str:
    """A short sha256 of token ids (a tensor, or a list of tensors hashed as one stream) as int64:
    what records of banks, studies and ablations use to tell one calibration or evaluation slice
    from another."""
    h = hashlib.sha256()
    for t in ([tokens] if isinstance(tokens, torch.Tensor) else list(tokens or [])):
        h.update(t.detach().cpu().to(torch.int64).numpy().tobytes())
    return h.hexdigest()[:16]


def sample_windows(ids: torch.Tensor, n: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """``n`` random windows ``[n, seqlen]`` of a token stream, reproducible from ``seed``.

    The calibration protocol of GPTQ (128 x 2048) and AWQ (128 x 512): each window starts at a
    uniformly drawn offset of the training split.
    """
    ids = ids.reshape(-1)
    if n < 1:
        raise ValueError(f"need at least one calibration window, got n={n}")
    if ids.numel() <= seqlen:
        raise ValueError(
            f"cannot draw windows of {seqlen} tokens from {ids.numel()} tokens: "
            "use a shorter seqlen or a larger text"
        )
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (n,), generator=g)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])
