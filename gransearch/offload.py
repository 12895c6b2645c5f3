"""Models larger than memory: the weights stay in their safetensors files until a block needs them.

:class:`DiskModel` opens a model folder (``config.json`` and ``model.safetensors``, or shards listed
by ``model.safetensors.index.json``) without reading its weights: the model is built with every
parameter on the ``meta`` device (buffers, such as rotary frequencies, are computed as usual), then
the parameters outside the decoder blocks (embeddings, final norm, an untied head) are read. A block
is read with :meth:`DiskModel.load_block` when it runs and dropped with :meth:`DiskModel.release_block`
after, so the memory held is the embeddings, one block, its calibration inputs and statistics.

Reading goes through ``safetensors.safe_open`` (memory-mapped), opened per block and closed again so
the pages of finished blocks leave the process. Tensors are converted to ``dtype`` (float32 by
default: the same arithmetic as a model loaded whole with :func:`gransearch.load_model`, so a model
quantized block by block from disk gets the codes it gets in memory, bit for bit).

    >>> dm = DiskModel("path/to/model")                     # doctest: +SKIP
    >>> gs.quantize(dm, "w4g64", calib, "gptq", save="out")  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from typing import Callable, Iterator, Optional, Union

import torch
from torch import nn

from .arch import arch_of, get_blocks, get_module

log = logging.getLogger(__name__)

__all__ = ["DiskModel", "checkpoint_files", "counted", "empty_model", "float32_nbytes", "open_folder", "perplexity", "release_freed_memory",
           "scratch_dir"]

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def scratch_dir(target: str, kind: str) -> str:
    """A new hidden folder beside ``target`` for a run writing it (``kind``: ``partial``, ``states``),
    named with this host and pid; folders of the same kind left by dead runs on this host (killed:
    nothing removed them) are removed first."""
    import re
    import shutil
    import socket
    import tempfile

    from .study import _pid_alive

    target = os.path.abspath(target)
    parent, base = os.path.dirname(target), os.path.basename(target)
    os.makedirs(parent, exist_ok=True)
    host = socket.gethostname()
    pattern = re.compile(rf"^\.{re.escape(base)}\.{kind}-{re.escape(host)}-(\d+)-")
    for name in os.listdir(parent):
        m = pattern.match(name)
        if m and not _pid_alive(int(m.group(1))):
            log.warning("removing %s, left by a run that was killed", os.path.join(parent, name))
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
    return tempfile.mkdtemp(prefix=f".{base}.{kind}-{host}-{os.getpid()}-", dir=parent)


_LIBC = []
TRIM_BYTES = 256 << 20  # DiskModel.release_block hands freed memory back once the resident set grew this much


def resident_bytes() -> Optional[int]:
    """This process's resident set now, in bytes (Linux; ``None`` elsewhere)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def release_freed_memory() -> None:
    """Hand memory freed by the allocator back to the system (glibc's ``malloc_trim``; a no-op elsewhere).

    Block after block of same-sized tensors leaves glibc's heap fragmented: without this the
    resident size of a from-disk run grows by about a block's quantized size per block (measured on
    the 1.7B-shaped benchmark: 0.66 GB flat with it, 2.0 GB after 24 blocks without)."""
    if not _LIBC:
        try:
            import ctypes

            _LIBC.append(ctypes.CDLL("libc.so.6").malloc_trim)
        except (OSError, AttributeError):
            _LIBC.append(None)
    if _LIBC[0] is not None:
        _LIBC[0](0)


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Every parameter registered inside the block is moved to the ``meta`` device (no storage);
    buffers stay real. A module's ``__init__`` still creates each parameter once before it moves,
    so the transient peak is the largest single parameter."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def empty_model(config, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False) -> nn.Module:
    """A causal LM of ``config`` whose parameters are on ``meta`` (no memory) and whose buffers are real."""
    from transformers import AutoModelForCausalLM

    with _parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    return model.eval()


def checkpoint_files(folder: str) -> dict[str, str]:
    """``{tensor name: safetensors file}`` of a model folder: the index of a sharded checkpoint, or
    the one ``model.safetensors``. Other formats are refused with what to do."""
    index = os.path.join(folder, "model.safetensors.index.json")
    single = os.path.join(folder, "model.safetensors")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as fh:
            weight_map = json.load(fh).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index} has no weight_map: not a safetensors index")
        return {k: os.path.join(folder, v) for k, v in weight_map.items()}
    if os.path.isfile(single):
        from safetensors import safe_open

        with safe_open(single, framework="pt") as fh:
            return {k: single for k in fh.keys()}
    found = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    raise FileNotFoundError(f"{folder} has no model.safetensors or model.safetensors.index.json (found: {found[:8]}): "
                            "reading a model block by block needs safetensors weights; convert .bin/.pt checkpoints "
                            "once with transformers (save_pretrained writes safetensors)")


def float32_nbytes(folder: str) -> int:
    """Bytes the model's floating-point weights take in float32 (from the safetensors headers only)."""
    from safetensors import safe_open

    total = 0
    by_file: dict[str, list[str]] = {}
    for name, path in checkpoint_files(folder).items():
        by_file.setdefault(path, []).append(name)
    for path, names in by_file.items():
        with safe_open(path, framework="pt") as fh:
            for n in names:
                sl = fh.get_slice(n)
                numel = 1
                for d in sl.get_shape():
                    numel *= int(d)
                total += numel * 4 if sl.get_dtype() in ("F32", "F16", "BF16", "F64") else 0
    return total


class DiskModel:
    """A model folder read one decoder block at a time (see the module docstring).

    ``model``: the model, parameters on ``meta`` except those outside the blocks; ``dtype``: what
    parameters are converted to when read; ``folder``: where they are read from. Used by
    :func:`gransearch.quantize` (``save=DIR`` writes the quantized checkpoint block by block).
    """

    def __init__(self, folder: str, dtype: Union[str, torch.dtype] = torch.float32, trust_remote_code: bool = False):
        from transformers import AutoConfig

        if isinstance(dtype, str):
            if dtype not in _DTYPES:
                raise ValueError(f"unknown dtype {dtype!r}: use one of {', '.join(_DTYPES)}")
            dtype = _DTYPES[dtype]
        from .models import model_folder

        folder = model_folder(folder, trust_remote_code)  # a hub id: its snapshot in the Hugging Face cache
        self.folder = os.path.abspath(folder)
        self.dtype = dtype
        self.files = checkpoint_files(folder)
        self.config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
        self.quantized: dict = {}  # {linear name: spec} of a quantized checkpoint, dequantized as read
        scheme = None
        from .export import quantization_method, read_scheme

        if quantization_method(folder) is not None:
            try:
                _, scheme = read_scheme(folder)
            except ValueError as exc:
                raise ValueError(f"{folder} is quantized in a layout gransearch does not read ({exc}); gransearch reads weight-only "
                                 "compressed-tensors pack-quantized, GPTQ and AWQ (GEMM) checkpoints: load it whole with transformers, or "
                                 "read the float model") from None
            if hasattr(self.config, "quantization_config"):
                del self.config.quantization_config
        self.scheme = scheme
        published = getattr(self.config, "dtype", None) or getattr(self.config, "torch_dtype", None)
        self.model = empty_model(self.config, dtype, trust_remote_code)
        if scheme is not None:
            self.quantized = scheme.resolve(self.model)
        head = self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
        # a quantized head (GPTQModel's lm_head=True, a compressed-tensors target) is its own tensor even
        # where the config ties it: untied here, read when the head scores (head_weight)
        self.head_name = next((n for n, m in self.model.named_modules() if m is head), None) if head is not None else None
        self.head_quantized = self.head_name is not None and self.head_name in self.quantized
        if self.head_quantized and getattr(self.config, "tie_word_embeddings", False):
            head.weight = nn.Parameter(torch.empty(head.weight.shape, dtype=head.weight.dtype, device="meta"), requires_grad=False)
        if published is not None:  # what a checkpoint written from it stores floats in (save_quantized's default)
            self.model.config.dtype = published
        self.info = arch_of(self.model)
        self.n_blocks = len(get_blocks(self.model, self.info))
        self._loaded: set[int] = set()
        self._trimmed_rss: Optional[int] = None  # the resident set after memory was last handed back (release_block)
        params = dict(self.model.named_parameters(remove_duplicate=False))
        # a tied table saved once under the head's name (transformers keeps one name per shared tensor)
        self.alias: dict[str, str] = {}
        emb = self.model.get_input_embeddings() if hasattr(self.model, "get_input_embeddings") else None
        emb_name = next((n for n, p in params.items() if emb is not None and p is emb.weight), None)
        if emb_name and emb_name not in self.files and "lm_head.weight" in self.files and self._tied("lm_head.weight"):
            self.alias[emb_name] = "lm_head.weight"
            self.files[emb_name] = self.files["lm_head.weight"]
        missing = [n for n in params if n not in self.files and not self._tied(n) and n.removesuffix(".weight") not in self.quantized]
        if missing:
            raise ValueError(f"{folder}: the checkpoint lacks {missing[:5]}{' ...' if len(missing) > 5 else ''} "
                             "(written for another architecture or config?)")
        # an untied output head is not read: nothing quantized from disk runs it, and a checkpoint
        # written from here copies it from its file (read_tensor)
        self.unread = set()
        if head is not None and (self.head_quantized or not getattr(self.config, "tie_word_embeddings", False)):
            self.unread = {n for n, p in self.model.named_parameters() if any(p is q for q in head.parameters())}
        # a tied head is the embedding (tie_weights below): its table is read once
        self._read([n for n in params if self._block_of(n) is None and n in self.files and n not in self.unread and not self._tied(n)])
        if self._tied("lm_head.weight") and hasattr(self.model, "tie_weights"):
            self.model.tie_weights()
        still = [n for n, p in self.model.named_parameters() if p.is_meta and self._block_of(n) is None and n not in self.unread]
        if still:
            raise ValueError(f"{folder}: parameters outside the blocks were not read: {still[:5]}")

    def _tied(self, name: str) -> bool:
        return name == "lm_head.weight" and bool(getattr(self.config, "tie_word_embeddings", False)) and not self.head_quantized

    def head_weight(self) -> Optional[torch.Tensor]:
        """The output head's weight where it is not in memory: a quantized head's codes dequantized in
        ``dtype`` (as :func:`gransearch.load_quantized`'s layer computes it), an untied float head read
        from its file; ``None`` when the head is in memory (tied to the embedding)."""
        head = self.model.get_output_embeddings()
        if not head.weight.is_meta:
            return None
        if self.head_quantized:
            return self._stored_weights([self.head_name])[self.head_name].dequantize(self.dtype)
        return self.read_tensor(_head_name(self))

    def _block_of(self, name: str) -> Optional[int]:
        prefix = self.info.blocks + "."
        if not name.startswith(prefix):
            return None
        return int(name[len(prefix):].split(".", 1)[0])

    def block_prefix(self, index: int) -> str:
        return f"{self.info.blocks}.{index}."

    def _read(self, names: list[str]) -> int:
        """Read ``names`` from the checkpoint into the model (converted to ``dtype``); returns bytes read."""
        from safetensors import safe_open

        by_file: dict[str, list[str]] = {}
        for n in names:
            by_file.setdefault(self.files[n], []).append(n)
        nbytes = 0
        for path, group in by_file.items():
            with safe_open(path, framework="pt") as fh:  # closed per call: the mapped pages leave with it
                for n in group:
                    t = fh.get_tensor(self.alias.get(n, n))
                    nbytes += t.numel() * t.element_size()
                    owner, _, leaf = n.rpartition(".")
                    mod = get_module(self.model, owner) if owner else self.model
                    if leaf in mod._parameters:
                        old = mod._parameters[leaf]
                        if tuple(old.shape) != tuple(t.shape):
                            raise ValueError(f"{path}: {n} has shape {tuple(t.shape)}, the model expects {tuple(old.shape)}")
                        value = t
                        if t.is_floating_point() and t.dtype != self.dtype:
                            if isinstance(mod, nn.Embedding) and t.element_size() < torch.tensor([], dtype=self.dtype).element_size():
                                # the table stays as stored (half the memory of a float32 copy); its rows are
                                # upcast when looked up, exactly, so blocks see what a float32 table gives
                                if not getattr(mod, "_gs_upcast", False):
                                    mod.register_forward_hook(lambda m, a, o, dt=self.dtype: o.to(dt))
                                    mod._gs_upcast = True
                            else:
                                value = t.to(self.dtype)
                        mod._parameters[leaf] = nn.Parameter(value, requires_grad=False)
                    elif leaf in mod._buffers:
                        mod._buffers[leaf] = t.to(self.dtype) if t.is_floating_point() else t
        return nbytes

    def _read_quantized(self, names: list[str]) -> None:
        """Quantized linears of a quantized checkpoint: their codes dequantized into the linear's
        weight, in ``dtype`` (what :func:`gransearch.load_quantized`'s layers compute with)."""
        for name, qw in self._stored_weights(names).items():
            mod = get_module(self.model, name)
            mod._parameters["weight"] = nn.Parameter(qw.dequantize(self.dtype), requires_grad=False)

    def _stored_weights(self, names: list[str]) -> dict:
        """``{name: QuantizedWeight}`` of quantized layers as the checkpoint stores them, their tensors
        read at once (each file opened once)."""
        keys = [f"{n}.{k}" for n in names for k in self.scheme.suffixes if f"{n}.{k}" in self.files]
        stored = self.read_tensors(keys)
        return {name: self.scheme.layer(stored, name, self.quantized[name]) for name in names}

    def check_float(self, what: str) -> None:
        """Refuse a quantized checkpoint where ``what`` needs the float model."""
        if self.quantized:
            raise ValueError(f"{self.folder} is already quantized ({len(self.quantized)} layers): {what} needs the float model")

    def read_tensor(self, name: str) -> torch.Tensor:
        """The tensor ``name`` as stored in the checkpoint (its own dtype)."""
        return self.read_tensors([name])[name]

    def read_tensors(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The tensors ``names`` as stored, each file opened once."""
        from safetensors import safe_open

        by_file: dict[str, list[str]] = {}
        for n in names:
            by_file.setdefault(self.files[n], []).append(n)
        out = {}
        for path, group in by_file.items():
            with safe_open(path, framework="pt") as fh:
                out.update({n: fh.get_tensor(self.alias.get(n, n)) for n in group})
        return out

    def load_block(self, index: int) -> None:
        """Read block ``index``'s parameters from disk (a no-op when they are in memory)."""
        if index in self._loaded:
            return
        prefix = self.block_prefix(index)
        self._read([n for n in self.files if n.startswith(prefix)])
        self._read_quantized([n for n in self.quantized if n.startswith(prefix)])
        block = get_blocks(self.model, self.info)[index]
        left = [n for n, p in block.named_parameters() if p.is_meta]
        if left:
            raise ValueError(f"{self.folder}: block {index} lacks {[prefix + n for n in left[:5]]}")
        self._loaded.add(index)

    def release_block(self, index: int) -> None:
        """Drop block ``index``'s parameters (back to ``meta``), whatever replaced its linears.

        The memory freed is handed back to the system (:func:`release_freed_memory`) once the
        resident set has grown :data:`TRIM_BYTES` past where the last hand-back left it: at every
        block when blocks are large, rarely when the freed memory is reused for the next block as it
        is (handing it back costs its page faults again when it is taken back)."""
        block = get_blocks(self.model, self.info)[index]
        for mod in block.modules():
            for leaf, p in list(mod._parameters.items()):
                if p is not None and not p.is_meta:
                    mod._parameters[leaf] = nn.Parameter(p.detach().to("meta"), requires_grad=False)
            for leaf, b in list(mod._buffers.items()):
                if b is not None and leaf not in getattr(mod, "_non_persistent_buffers_set", set()) and b.numel() > 0:
                    mod._buffers[leaf] = b.to("meta")
            if getattr(mod, "_w_cache", None) is not None:  # a QuantLinear's dequantized weight
                mod._w_cache = None
        self._loaded.discard(index)
        rss = resident_bytes()
        if rss is None or self._trimmed_rss is None or rss - self._trimmed_rss >= TRIM_BYTES:
            release_freed_memory()
            self._trimmed_rss = resident_bytes()

    def weights_fingerprint(self, samples: int = 4096) -> str:
        """:func:`gransearch.plan.weights_fingerprint` of the model this folder loads in ``dtype``
        (the same value as for the model loaded whole), each tensor read from disk in turn."""
        import hashlib

        from safetensors import safe_open

        from .plan import model_fingerprint

        h = hashlib.sha256(model_fingerprint(self.model).encode())
        handles: dict = {}
        try:
            for name, p in self.model.named_parameters():
                dtype = self.dtype if p.is_floating_point() else p.dtype
                if p.is_meta or p.dtype != dtype:
                    path = self.files[name]
                    if path not in handles:
                        handles.clear()  # one file open at a time
                        handles[path] = safe_open(path, framework="pt")
                    t = handles[path].get_tensor(self.alias.get(name, name))
                else:
                    t = p.detach()
                flat = t.reshape(-1)
                step = max(1, flat.numel() // samples)
                sample = flat[::step][:samples].to("cpu", torch.float32).contiguous()
                h.update(f"{name}:{tuple(p.shape)}:{dtype};".encode())
                h.update(sample.numpy().tobytes())
        finally:
            handles.clear()
        return h.hexdigest()[:16]

    def tokenizer_files(self) -> list[str]:
        """The tokenizer and generation files of the folder, copied beside a checkpoint written from it."""
        names = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
                 "merges.txt", "generation_config.json", "chat_template.jinja")
        return [os.path.join(self.folder, n) for n in names if os.path.isfile(os.path.join(self.folder, n))]

    def __repr__(self) -> str:
        return f"DiskModel({self.folder!r}, {self.n_blocks} blocks, dtype={self.dtype})"


def open_folder(folder: str, what: str, dtype: str = "float32", trust_remote_code: bool = False):
    """``(DiskModel, tokenizer)`` of a model folder read one block at a time; ``what`` names the
    work in the error refusing a dtype other than float32 (the arithmetic of the model loaded whole)."""
    from transformers import AutoTokenizer

    if dtype != "float32":
        raise ValueError(f"{what} from disk computes in float32 (--dtype float32)")
    dm = DiskModel(folder, trust_remote_code=trust_remote_code)
    return dm, AutoTokenizer.from_pretrained(dm.folder, trust_remote_code=trust_remote_code)


def counted(model, float_dtype, float_dtype_of_model: bool):
    """``(module, float dtype)`` that a byte count of ``model`` uses. A :class:`DiskModel` counts its
    meta model's shapes, and its floats at the dtype it computes in (as the model loaded whole holds
    them; it keeps a bf16 table as stored, to save memory) unless a dtype is given or the profile
    counts the published one (``float_dtype_of_model``); a model in memory is returned as given."""
    if not isinstance(model, DiskModel):
        return model, float_dtype
    if float_dtype is None and not float_dtype_of_model:
        float_dtype = model.dtype
    return model.model, float_dtype


class _Replay(nn.Module):
    """Stands in for a decoder block in the tail pass of :func:`perplexity`: returns the final
    hidden states computed block by block (the last block) or its input unchanged (the others), in
    the form the block returned; other attributes (e.g. Gemma's ``attention_type``) are the block's."""

    def __init__(self, block: nn.Module, states: Optional[list], tuple_out: bool):
        super().__init__()
        object.__setattr__(self, "_block", block)  # not a submodule: its meta parameters stay out of this one
        self.states, self.tuple_out, self.j = states, tuple_out, 0

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_block"), name)

    def forward(self, x, *args, **kwargs):
        y = x if self.states is None else self.states[self.j]
        return (y,) if self.tuple_out else y


@torch.no_grad()
def perplexity(model: DiskModel, ids: torch.Tensor, seqlen: int = 2048, batch_size: int = 1, max_windows: Optional[int] = None,
               device=None, weights: Optional[Callable[[str], Optional[torch.Tensor]]] = None, chunk_tokens: Optional[int] = None,
               verbose: bool = True):
    """:func:`gransearch.perplexity` of a model larger than memory, read one block at a time.

    Every evaluation window runs through block 0, then block 1, ... (their hidden states in memory:
    ``windows x seqlen x hidden`` floats), each block read from disk, run on ``device`` and dropped;
    then the final norm and the output head score them. The arithmetic is that of the model loaded
    whole, batch by batch, so the result is the same. ``weights(name)``, when given, replaces a
    linear's weight as its block is read (a tensor of the same shape, or ``None`` to keep the stored
    one): how a search trial can score its plan without the model in memory. Returns a
    :class:`~gransearch.evaluate.Perplexity`.

        >>> gs.offload.perplexity(DiskModel("path/to/model"), test_ids, seqlen=512)  # doctest: +SKIP
    """
    import math
    import time

    from .calibrate import BlockRunner
    from .errors import NonFiniteError, check_int, check_token_ids
    from .evaluate import Perplexity, _head_parts, windows

    seqlen = check_int("seqlen", seqlen, 2)
    batch_size = check_int("batch_size", batch_size, 1)
    hf = model.model
    check_token_ids(ids, getattr(hf.get_input_embeddings(), "num_embeddings", None), "the evaluation ids")
    if _head_parts(hf) is None:
        raise ValueError(f"perplexity from disk scores the final hidden states with the output head; {type(hf).__name__} "
                         "is not in gransearch.arch.HEAD_ON_BASE: load the model whole (gs.load_model)")
    w = windows(ids, seqlen, max_windows)
    t0 = time.perf_counter()
    runner = BlockRunner(model, w, batch_size, device)
    try:
        tuple_out = _run_blocks(model, runner, weights, verbose)
        total = _score_final_states(model, runner, w, batch_size, tuple_out, chunk_tokens)
    finally:
        runner.close()
    count = w.shape[0] * (seqlen - 1)
    mean = total / count
    if not math.isfinite(mean):
        raise NonFiniteError(f"perplexity from disk is not finite (mean NLL {mean}): the model's outputs are NaN or infinite")
    return Perplexity(math.exp(mean), mean, count, int(w.shape[0]), seqlen, time.perf_counter() - t0)


def _run_blocks(model: DiskModel, runner, weights, verbose: bool) -> bool:
    """Every block over the runner's windows, read from disk (linears replaced by ``weights``) and
    dropped; returns whether the blocks return tuples (the form the stand-ins must give)."""
    from tqdm.auto import tqdm

    from .arch import block_linears, linear_weight

    blocks = get_blocks(model.model, model.info)
    for i in tqdm(range(len(blocks)), desc="perplexity (from disk)", disable=not verbose, leave=False):
        runner.enter(i)
        try:
            if weights is not None:
                for ref in block_linears(model.model, i, model.info):
                    new = weights(ref.name)
                    if new is not None:
                        linear_weight(ref.module).copy_(new)
            runner.run(i, advance=True)
        finally:
            runner.leave(i)
    return runner.tuple_out  # as the last block returned its states


def _score_final_states(model: DiskModel, runner, w: torch.Tensor, batch_size: int, tuple_out: bool, chunk_tokens) -> float:
    """Summed NLL of the windows ``w`` from the final blocks' states (``runner.inputs``): the base
    model's own forward with every block replaced by a stand-in that returns those states (so the
    embedding, the final norm and the rotary tables run as usual), then the head in the states'
    dtype (a bf16 table upcast exactly for float32; an untied head read from its file)."""
    from .evaluate import _head_parts, chunked_nll

    hf = model.model
    base, head, cap = _head_parts(hf)
    dev, home = runner.device, runner.home
    hw = model.head_weight()
    hw = None if hw is None else hw.to(dev)
    hb = None if getattr(head, "bias", None) is None or head.bias.is_meta else head.bias.to(dev, torch.float32)

    def logits(x):  # in the states' dtype, as the model in memory computes them (float32 unless dtype says otherwise)
        return torch.nn.functional.linear(x, (head.weight if hw is None else hw).to(x.dtype), None if hb is None else hb.to(x.dtype))

    blocks = get_blocks(hf, model.info)
    saved = list(blocks)
    stand_ins = [_Replay(b, runner.inputs if k == len(saved) - 1 else None, tuple_out) for k, b in enumerate(saved)]
    total = 0.0
    try:
        for k, r in enumerate(stand_ins):
            blocks[k] = r
        base.to(dev)
        for j in range(0, w.shape[0], batch_size):
            stand_ins[-1].j = j // batch_size
            x = w[j : j + batch_size].to(dev)
            h = base(input_ids=x, use_cache=False)[0]
            total += float(chunked_nll(h[:, :-1].reshape(-1, h.shape[-1]), x[:, 1:].reshape(-1), logits, cap, chunk_tokens,
                                       int(hf.config.vocab_size)))
    finally:
        base.to(home)
        for k, b in enumerate(saved):
            blocks[k] = b
    return total


def _head_name(model: DiskModel) -> str:
    head = model.model.get_output_embeddings()
    return next(n for n, p in model.model.named_parameters(remove_duplicate=False) if p is head.weight)
