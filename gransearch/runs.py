"""Search runs: the text options of a run, its stored configuration, its folder, and joining one.

``gransearch optimize --out DIR`` stores its run configuration in the study, so that
:func:`join_study` (and ``gransearch worker``) can rebuild the same model, data and budget in
another process or on another machine. That configuration comes from storage, so
:func:`check_run_config` treats it as untrusted input. :func:`write_run_folder` writes what a run
leaves behind: ``plan.json``, ``pareto.csv``, ``summary.json`` and ``pareto.png``.

The option checks here are shared by the CLI's argument types and the stored-configuration check,
and each raises ``ValueError`` with the accepted range in its message.
"""

from __future__ import annotations

import csv
import json
import math
import os
from typing import Callable, Optional

__all__ = ["RUN_KEYS", "check_run_config", "join_study", "search_kwargs", "setup_search", "write_run_folder", "plot_pareto",
           "awq_rank", "int_at_least", "positive_float", "text_list", "csv_list", "gran_token"]

# the run configuration `optimize` stores in its study for workers
RUN_KEYS = ("model", "data", "dtype", "n_calib", "calib_seqlen", "seed", "budget_gb", "budget_bytes", "budget_like", "methods", "bits",
            "grans", "seqlen", "eval_windows", "batch_size", "act_order", "device", "bank_dir", "profile", "float_dtype", "bank_prune",
            "max_bank_gb", "proxy", "from_disk", "sampler", "awq_rank")


# ---- option checks on text -----------------------------------------------------------------


def awq_rank(text) -> Optional[int]:
    """``--awq-rank``: an integer >= 1, or ``exact`` (``None``: the whole Hessian)."""
    if str(text).strip().lower() == "exact":
        return None
    try:
        return int_at_least(text, 1)
    except ValueError:
        raise ValueError(f"awq rank must be an integer >= 1 or 'exact', got {text!r}") from None


def int_at_least(text, lo: int) -> int:
    """``text`` as an integer >= ``lo``; else ``ValueError`` with the range."""
    try:
        v = int(str(text))
    except ValueError:
        raise ValueError(f"expected an integer >= {lo}, got {text!r}") from None
    if v < lo:
        raise ValueError(f"expected an integer >= {lo}, got {v}")
    return v


def positive_float(text) -> float:
    """``text`` as a finite number > 0; else ``ValueError``."""
    try:
        v = float(str(text))
    except ValueError:
        raise ValueError(f"expected a number > 0, got {text!r}") from None
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"expected a finite number > 0, got {text!r}")
    return v


def text_list(text, what: str, check: Callable[[str], None]) -> str:
    """A non-empty comma-separated list whose items ``check`` accepts, normalised, kept as text."""
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        raise ValueError(f"give at least one {what}, comma-separated")
    for t in items:
        try:
            check(t)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"bad {what} {t!r}: {exc}") from None
    return ",".join(items)


def csv_list(text: str, cast=str) -> tuple:
    return tuple(cast(t) for t in text.split(",") if t)


def gran_token(t: str):
    """A granularity as written in a list: group sizes become ints, names stay text."""
    return int(t) if t.isdigit() else t


def check_bits_item(t: str) -> None:
    from .spec import PerChannel, QuantSpec

    QuantSpec(int(t), PerChannel())


def check_gran_item(t: str) -> None:
    from .spec import as_granularity

    as_granularity(gran_token(t))


def check_method_item(t: str) -> None:
    from .methods import Method

    if t not in {m.value for m in Method}:
        raise ValueError(f"use one of {', '.join(m.value for m in Method)}")


# the checks of the list options, by run-configuration key
LIST_CHECKS = {"methods": ("method", check_method_item), "bits": ("bit width", check_bits_item), "grans": ("granularity", check_gran_item)}
INT_CHECKS = {"n_calib": 1, "calib_seqlen": 2, "seqlen": 2, "eval_windows": 1, "batch_size": 1}


# ---- the stored run configuration ------------------------------------------------------------


def check_run_config(cfg) -> dict:
    """Validate a run configuration read from a study's storage (untrusted input): known keys of
    the right types and ranges, a model that is a packaged name, an existing path or a hub id, a
    corpus that exists, and a complete bank at an absolute path. Raises ``ValueError``."""
    from .data import check_text_name
    from .models import PACKAGED_MODELS
    from .spec import QuantSpec

    if not isinstance(cfg, dict):
        raise ValueError("the stored run configuration is not a JSON object")
    unknown = set(cfg) - set(RUN_KEYS)
    missing = {"model", "data", "n_calib", "calib_seqlen", "seed", "methods", "bits", "grans", "seqlen", "eval_windows", "batch_size"} - set(cfg)
    if unknown or missing:
        raise ValueError(f"the stored run configuration has unknown keys {sorted(unknown)} or lacks {sorted(missing)}")
    for key in list(INT_CHECKS) + list(LIST_CHECKS):  # the CLI's own argument checks, applied to the stored values
        if isinstance(cfg[key], bool) or not isinstance(cfg[key], (int, str)):
            raise ValueError(f"stored run configuration: {key} has the wrong type ({type(cfg[key]).__name__})")
        try:
            if key in INT_CHECKS:
                int_at_least(cfg[key], INT_CHECKS[key])
            else:
                text_list(cfg[key], *LIST_CHECKS[key])
        except ValueError as exc:
            raise ValueError(f"stored run configuration: {key}: {exc}") from None
    if not isinstance(cfg["seed"], int):
        raise ValueError("stored run configuration: seed must be an integer")
    budgets = [k for k in ("budget_gb", "budget_bytes", "budget_like") if cfg.get(k) is not None]
    if len(budgets) != 1:
        raise ValueError("stored run configuration: exactly one of budget_gb, budget_bytes, budget_like must be set")
    b = budgets[0]
    if b == "budget_like":
        QuantSpec.parse(str(cfg[b]))
    elif isinstance(cfg[b], bool) or not isinstance(cfg[b], (int, float)) or cfg[b] <= 0:
        raise ValueError(f"stored run configuration: {b} must be a number > 0")
    if cfg.get("dtype", "float32") not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"stored run configuration: dtype {cfg.get('dtype')!r} is not float32, bfloat16 or float16")
    if cfg.get("device") is not None and not (isinstance(cfg["device"], str) and cfg["device"].split(":")[0] in ("cpu", "cuda", "mps")):
        raise ValueError(f"stored run configuration: device {cfg['device']!r} is not cpu, cuda[:N] or mps")
    if not isinstance(cfg.get("act_order", True), bool):
        raise ValueError("stored run configuration: act_order must be true or false")
    from .profiles import PROFILES

    if cfg.get("profile", "research") not in PROFILES:
        raise ValueError(f"stored run configuration: profile {cfg.get('profile')!r} is not one of {', '.join(PROFILES)}")
    if cfg.get("float_dtype") not in (None, "float32", "bfloat16", "float16"):
        raise ValueError(f"stored run configuration: float_dtype {cfg.get('float_dtype')!r} is not float32, bfloat16 or float16")
    if not isinstance(cfg.get("from_disk", False), bool):
        raise ValueError("stored run configuration: from_disk must be true or false")
    if cfg.get("proxy", "ppl") not in ("ppl", "kl"):
        raise ValueError(f"stored run configuration: proxy {cfg.get('proxy')!r} is not 'ppl' or 'kl'")
    from .search import SAMPLERS

    if cfg.get("sampler", "independent") not in SAMPLERS:
        raise ValueError(f"stored run configuration: sampler {cfg.get('sampler')!r} is not one of {', '.join(SAMPLERS)}")
    rank = cfg.get("awq_rank", 64)
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(f"stored run configuration: awq_rank {rank!r} is not an integer >= 1 or null (the exact Hessian)")
    if cfg.get("bank_prune") not in (None, "dominated"):
        raise ValueError(f"stored run configuration: bank_prune {cfg.get('bank_prune')!r} is not null or 'dominated'")
    mb = cfg.get("max_bank_gb")
    if mb is not None and (isinstance(mb, bool) or not isinstance(mb, (int, float)) or not math.isfinite(mb) or mb <= 0):
        raise ValueError("stored run configuration: max_bank_gb must be a number > 0")
    model = cfg["model"]
    if not isinstance(model, str) or not model:
        raise ValueError("stored run configuration: model must be a non-empty string")
    looks_local = model.endswith(".gguf") or model.startswith((".", "/", "~")) or os.sep + os.sep in model
    if model not in PACKAGED_MODELS and looks_local and not os.path.exists(model):
        raise ValueError(f"stored run configuration: model path {model!r} does not exist on this machine")
    if not isinstance(cfg["data"], str):
        raise ValueError("stored run configuration: data must be a string")
    check_text_name(cfg["data"])
    bank_dir = cfg.get("bank_dir")
    if bank_dir is not None:
        if not isinstance(bank_dir, str) or not os.path.isabs(bank_dir):
            raise ValueError(f"stored run configuration: bank_dir {bank_dir!r} must be an absolute path")
        if not os.path.isdir(bank_dir):
            raise ValueError(f"the run's bank folder {bank_dir} does not exist on this machine: start workers on a machine that "
                             "sees the run folder (they build the bank together there), or give this worker a folder of its own "
                             "(worker --bank-dir DIR, join_study(bank_dir=DIR))")
    return cfg


def setup_search(cfg: dict, trust_remote_code: bool = False):
    """``(model, calib, validation ids, test ids, budget bytes)`` of a run configuration."""
    import gransearch as gs

    gs.data.check_text_name(cfg["data"])
    if cfg.get("from_disk"):  # larger than memory: a DiskModel (blocks read as they run), the tokenizer from the folder
        model, tok = gs.offload.open_folder(cfg["model"], "a search", cfg.get("dtype", "float32"), trust_remote_code)
    else:
        model, tok = gs.load_model(cfg["model"], dtype=cfg.get("dtype", "float32"), device=cfg.get("device"),
                                   trust_remote_code=trust_remote_code)
    if cfg.get("profile") in ("gguf", "gguf-asym"):  # search the model llama.cpp will run: its embedding as the GGUF stores it
        from .export.gguf import round_embeddings

        round_embeddings(model, "Q8_0")
    calib = gs.sample_windows(gs.load_tokens(cfg["data"], tok, "train"), cfg["n_calib"], cfg["calib_seqlen"], seed=cfg["seed"])
    val = gs.load_tokens(cfg["data"], tok, "validation")
    test = gs.load_tokens(cfg["data"], tok, "test")
    if cfg.get("budget_like"):
        budget = budget_like(model, cfg["budget_like"], cfg.get("profile", "research"), cfg.get("float_dtype"))
    elif cfg.get("budget_bytes"):
        budget = int(cfg["budget_bytes"])
    else:
        budget = int(round(cfg["budget_gb"] * gs.plan.GB))
    return model, calib, val, test, budget


def budget_like(model, spec: str, profile: str = "research", float_dtype=None) -> int:
    """The bytes of the uniform plan ``spec`` as ``profile`` counts them (its storage format and,
    for ``vllm``, floats at the dtype they are written in); ``model`` may be a DiskModel, counted as
    :func:`gransearch.optimize` counts it."""
    from .export import float_dtype_of
    from .offload import counted
    from .plan import QuantPlan, plan_nbytes
    from .profiles import get_profile

    prof = get_profile(profile)
    model, float_dtype = counted(model, float_dtype, prof.float_dtype_of_model)
    fdt = float_dtype_of(model, float_dtype) if (float_dtype is not None or prof.float_dtype_of_model) else None
    return plan_nbytes(model, QuantPlan.uniform(model, spec, "rtn").layers, prof.format, fdt)


def search_kwargs(cfg: dict) -> dict:
    """The keyword arguments of :func:`gransearch.optimize` that a run configuration sets."""
    return dict(methods=csv_list(cfg["methods"]), bits=csv_list(cfg["bits"], int), granularities=csv_list(cfg["grans"], gran_token),
                seqlen=cfg["seqlen"], eval_windows=cfg["eval_windows"], batch_size=cfg["batch_size"], seed=cfg["seed"], device=cfg.get("device"),
                act_order=cfg.get("act_order", True), bank_dir=cfg.get("bank_dir"), profile=cfg.get("profile", "research"),
                float_dtype=cfg.get("float_dtype"), bank_prune=cfg.get("bank_prune"), max_bank_gb=cfg.get("max_bank_gb"),
                proxy=cfg.get("proxy", "ppl"), sampler=cfg.get("sampler", "independent"), awq_rank=cfg.get("awq_rank", 64))


def join_study(storage: str, study_name: str, n_trials: Optional[int] = None, *, device=None, bank_dir: Optional[str] = None,
               trust_remote_code: bool = False, verbose: bool = True):
    """Add this process to a running search (what ``gransearch worker`` does), from Python.

    Reads and checks the run configuration that ``gransearch optimize`` stored in the study, loads
    the same model and data, helps build the candidate bank in the run's bank folder (or in
    ``bank_dir``, one of this machine's own), and runs trials until the study holds ``n_trials``
    complete or pruned trials (default: 20 more than now), whichever worker ran them. ``device``:
    where this worker computes (``"cuda:1"``; default: the run's device); each trial records its
    worker and device. A missing study raises ``ValueError`` and creates nothing; remote model code
    runs only when this call allows it, never because the stored configuration says so. Returns
    the :class:`~gransearch.search.OptimizeResult` (no final stage: that is the first process's job).
    """
    from .search import optimize
    from .study import open_study

    study = open_study(storage, study_name, create=False)
    raw = study.user_attrs.get("cli_config")
    if raw is None:
        raise ValueError(f"study {study_name!r} has no run configuration yet: start it with `gransearch optimize` first")
    try:
        cfg = json.loads(raw)
    except (TypeError, ValueError):
        raise ValueError(f"study {study_name!r}: its stored run configuration is not valid JSON") from None
    if bank_dir is not None:
        bank_dir = os.path.abspath(bank_dir)
        os.makedirs(bank_dir, exist_ok=True)
    if device is not None:
        from .errors import check_device

        check_device(device)
    if isinstance(cfg, dict):  # this worker's own folder and device replace the stored ones (anything else is refused below)
        cfg = {**cfg, **({"bank_dir": bank_dir} if bank_dir else {}), **({"device": str(device)} if device is not None else {})}
    cfg = check_run_config(cfg)
    model, calib, val, _, budget = setup_search(cfg, trust_remote_code)
    counted = sum(t.state.name in ("COMPLETE", "PRUNED") for t in study.get_trials(deepcopy=False))
    return optimize(model, budget_bytes=budget, calib=calib, eval_ids=val, n_trials=n_trials or counted + 20, storage=storage,
                    study_name=study_name, n_final=0, warm_start=False, verbose=verbose, **search_kwargs(cfg))


# ---- the run folder --------------------------------------------------------------------------


def write_run_folder(out: str, res, budget: int, storage: str, study_name: str) -> dict:
    """Write ``plan.json``, ``pareto.csv``, ``summary.json`` and ``pareto.png`` of a finished
    search into ``out``; returns the summary."""
    from .plan import GB

    res.plan.save(os.path.join(out, "plan.json"))
    with open(os.path.join(out, "pareto.csv"), "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["trial", "nbytes", "gb", "proxy_ppl", "plan"])
        for p in res.pareto:
            w.writerow([p.trial, p.nbytes, f"{p.nbytes / GB:.6f}", f"{p.ppl:.4f}", json.dumps(p.plan.summary())])
    summary = {"budget_bytes": budget, "budget_gb": budget / GB, "plan_bytes": res.nbytes, "proxy": res.plan.meta.get("proxy", "ppl"), "proxy_ppl": res.proxy_ppl,
               "final_ppl": res.ppl, "proxy_gap": res.proxy_gap if "proxy" not in res.plan.meta else None, "finals": res.finals, "uniform_proxy": res.baselines,
               "trials": res.n_trials, "bank_seconds": res.bank_seconds, "search_seconds": res.search_seconds,
               "plan": res.plan.summary(), "storage": storage, "study": study_name,
               "accounting": {k: res.plan.meta[k] for k in ("profile", "format", "float_dtype") if k in res.plan.meta}}
    with open(os.path.join(out, "summary.json"), "w") as fh:
        json.dump(summary, fh, indent=2)
    plot_pareto(res, budget, os.path.join(out, "pareto.png"))
    return summary


def plot_pareto(res, budget: int, path: str) -> None:
    """Every complete trial's bytes against its proxy perplexity, the Pareto front and the budget
    (skipped without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # plotting is optional
        return
    import optuna

    from .plan import GB

    done = [t for t in res.study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter([t.user_attrs["nbytes"] / GB for t in done], [t.value for t in done], s=12, alpha=0.5, label="trials")
    ax.plot([p.nbytes / GB for p in res.pareto], [p.ppl for p in res.pareto], "r.-", label="Pareto front")
    ax.axvline(budget / GB, color="gray", ls="--", label="budget")
    ax.set_xlabel("model size as stored (GB)")
    ax.set_ylabel("validation perplexity (proxy)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
