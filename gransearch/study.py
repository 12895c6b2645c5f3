"""The Optuna study of a search: opened safely, bound to one search, resumed without losses.

A study's trial values are only comparable when every trial measured the same thing: the same
model weights, candidates, budget, calibration and proxy objective. :func:`bind_study` records
all of that (the *search record*) the first time and refuses a study made for anything else,
naming what changed. Trials store their plan by content (``method:spec`` per layer), never as
positions in a bank, so a bank rebuilt in another order cannot change what a stored trial means.

Resuming: :func:`fail_dead_trials` marks the RUNNING trials of workers that died on this host
FAILED (and Optuna's heartbeat does the same for other hosts after a grace period); either way the
failed trial is enqueued again once (:func:`retry_failed`), and :func:`enqueue_missing` re-enqueues
every warm start (uniform baselines, neutral knapsacks) that has no finished or pending trial, so
that "never worse than the best uniform plan" survives a kill.

Several workers: :func:`run_trials` takes each trial under :func:`storage_lock` (a file lock beside
SQLite, an advisory lock on PostgreSQL), and only while fewer than ``n_trials`` are complete,
pruned or running, so a study of ``n_trials`` ends with exactly that many counted trials whatever
the number of workers; a running trial records a heartbeat, and one whose worker died is failed
and re-run by another.

Reads: the sampler and the pruner see the study through :class:`PerTrialReads`, one read of its
trials per trial instead of one per suggested weight and per pruning check (each a round trip to
the database of an RDB storage: most of a trial's cost on a GPU, where an evaluation takes 0.1 s).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import json
import logging
import os
import socket
import threading
import time
import warnings
from typing import Callable, Iterator, Optional, Sequence

from ._files import atomic_write
from .errors import StudyMismatchError

log = logging.getLogger(__name__)

__all__ = ["open_study", "bind_study", "bind_file", "fail_dead_trials", "enqueue_missing", "worker_id", "describe_changes",
           "retry_failed", "run_trials", "storage_lock", "PerTrialReads", "SEARCH_RECORD_VERSION", "HEARTBEAT_SECONDS",
           "GRACE_SECONDS"]

SEARCH_RECORD_VERSION = 1


def _env_seconds(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number of seconds") from None
    if not value > 0:
        raise ValueError(f"{name}={raw!r} must be > 0 seconds")
    return value


# a running trial writes a heartbeat this often (RDB storages), and is taken for dead (FAILED) when
# none came for GRACE_SECONDS; both can be set for every process of a search through the environment
HEARTBEAT_SECONDS = _env_seconds("GRANSEARCH_HEARTBEAT_SECONDS", 60)
GRACE_SECONDS = _env_seconds("GRANSEARCH_GRACE_SECONDS", 180)
POLL_SECONDS = 1.0  # how often a worker with nothing to take looks again


def worker_id() -> str:
    """``host:pid`` of this process (``GRANSEARCH_WORKER_HOST`` replaces the host name), stored on
    each trial it runs."""
    return f"{os.environ.get('GRANSEARCH_WORKER_HOST') or socket.gethostname()}:{os.getpid()}"


class _StudyAsItStood:
    """A study whose trial reads (``get_trials``, ``_get_trials``, ``trials``) answer from a list taken
    once; everything else (direction, storage, attributes) is the study's own."""

    def __init__(self, study, trials):
        self._study, self._trials = study, trials

    def __getattr__(self, name):
        return getattr(self._study, name)

    def get_trials(self, deepcopy: bool = True, states=None):
        trials = list(self._trials) if states is None else [t for t in self._trials if t.state in states]
        return copy.deepcopy(trials) if deepcopy else trials

    def _get_trials(self, deepcopy: bool = True, states=None, use_cache: bool = False):
        return self.get_trials(deepcopy, states)

    @property
    def trials(self):
        return self.get_trials()


class PerTrialReads:
    """One read of a study's trials per trial, shared by its sampler and its pruner.

    Optuna's TPE sampler (its constant liar, on by default since Optuna 5, reads the running trials
    too, so it never uses Optuna's per-trial cache) reads every trial of the study once per
    suggested weight, and the median pruner once per reported window: about 14 reads a trial, each
    several queries through SQLAlchemy to an RDB storage (milliseconds each), against one here. The
    first read a trial makes is kept and answers the rest of that trial's reads
    (``benchmarks/trial_storage.py``: what SQLite adds to a trial, 0.54x).

    What the sampler and the pruner see is the same for one worker: the trials other than the
    current one cannot change during it (the sampler leaves the current one out by its number).
    With several workers on one study, a trial's pruning compares with the trials complete when its
    sampling began, not with ones other workers finish during its evaluation; its sampling reads
    are a few milliseconds apart either way. ``ENABLED = False`` reads as Optuna does (tests and
    ``benchmarks/trial_storage.py`` compare the two).
    """

    ENABLED = True

    def __init__(self):
        self._study, self._number, self._view = None, None, None

    def view(self, study, trial):
        """``study`` as it stood at this trial's first read (``study`` itself when disabled)."""
        if not PerTrialReads.ENABLED:
            return study
        if study is not self._study or trial.number != self._number:
            self._view = _StudyAsItStood(study, study.get_trials(deepcopy=False))
            self._study, self._number = study, trial.number
        return self._view

    def wrap(self, sampler, pruner):
        """The sampler and pruner that read the study through :meth:`view` (``None`` stays ``None``)."""
        reading_sampler, reading_pruner = _reading_classes()
        return (None if sampler is None else reading_sampler(sampler, self)), (None if pruner is None else reading_pruner(pruner, self))


@functools.lru_cache(maxsize=None)
def _reading_classes():
    """Optuna's sampler and pruner interfaces, delegating to an inner one through a
    :class:`PerTrialReads` (made on first use: Optuna is imported lazily)."""
    import optuna

    class ReadingSampler(optuna.samplers.BaseSampler):
        """A sampler that reads the study once per trial."""

        def __init__(self, inner, reads: PerTrialReads):
            self.inner, self.reads = inner, reads

        def __getattr__(self, name):  # the inner sampler's own settings (its seed, startup trials)
            if name in ("inner", "reads"):
                raise AttributeError(name)
            return getattr(self.inner, name)

        def infer_relative_search_space(self, study, trial):
            return self.inner.infer_relative_search_space(self.reads.view(study, trial), trial)

        def sample_relative(self, study, trial, search_space):
            return self.inner.sample_relative(self.reads.view(study, trial), trial, search_space)

        def sample_independent(self, study, trial, param_name, param_distribution):
            return self.inner.sample_independent(self.reads.view(study, trial), trial, param_name, param_distribution)

        def before_trial(self, study, trial):
            self.inner.before_trial(study, trial)

        def after_trial(self, study, trial, state, values):
            self.inner.after_trial(study, trial, state, values)

        def reseed_rng(self):
            self.inner.reseed_rng()

    class ReadingPruner(optuna.pruners.BasePruner):
        """A pruner that reads the study once per trial."""

        def __init__(self, inner, reads: PerTrialReads):
            self.inner, self.reads = inner, reads

        def prune(self, study, trial):
            return self.inner.prune(self.reads.view(study, trial), trial)

    return ReadingSampler, ReadingPruner


def _sqlite_path(storage) -> Optional[str]:
    if isinstance(storage, str) and storage.startswith("sqlite:///"):
        return storage[len("sqlite:///"):]
    return None


def _is_postgres(storage) -> bool:
    return isinstance(storage, str) and storage.split(":", 1)[0].split("+", 1)[0] in ("postgresql", "postgres")


_ENGINES: dict = {}


@contextlib.contextmanager
def _advisory_lock(url: str) -> Iterator[None]:
    """PostgreSQL's session advisory lock (one key per database): released by the server when the
    holder's connection ends, so a killed worker never leaves it held."""
    import sqlalchemy
    from sqlalchemy.pool import NullPool

    if url not in _ENGINES:
        _ENGINES[url] = sqlalchemy.create_engine(url, poolclass=NullPool)
    key = int.from_bytes(hashlib.sha256(b"gransearch.study").digest()[:8], "big", signed=True)
    with _ENGINES[url].connect() as conn:
        conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
        try:
            yield
        finally:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})


@contextlib.contextmanager
def storage_lock(storage) -> Iterator[None]:
    """An exclusive lock over a study storage: a file lock beside a SQLite database, an advisory
    lock on PostgreSQL (nothing for in-memory studies). Held while a study is created, checked and
    given its warm starts, and while a worker takes a trial: processes starting together see one
    another's work instead of racing to create the same rows or to run one trial too many."""
    if _is_postgres(storage):
        with _advisory_lock(storage):
            yield
        return
    path = _sqlite_path(storage)
    if path is None:
        yield
        return
    import fcntl

    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with open(os.path.abspath(path) + ".lock", "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _storage(storage):
    """An RDB storage with Optuna's heartbeat for URLs (``None``: in memory)."""
    import optuna

    if not isinstance(storage, str):
        return storage
    with warnings.catch_warnings():  # the heartbeat is marked experimental in Optuna
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        import inspect

        params = inspect.signature(optuna.storages.RDBStorage).parameters  # the callback was renamed in Optuna 4.9
        callback = "heartbeat_stale_trial_callback" if "heartbeat_stale_trial_callback" in params else "failed_trial_callback"
        return optuna.storages.RDBStorage(storage, heartbeat_interval=int(max(1, HEARTBEAT_SECONDS)), grace_period=int(max(1, GRACE_SECONDS)),
                                          **{callback: retry_failed})


def open_study(storage, study_name: str, *, sampler=None, pruner=None, create: bool = True):
    """Create or load ``study_name`` in ``storage`` (a URL, a storage object or ``None``).

    ``create=False`` only loads, and a missing study (or a missing SQLite file, which is then not
    created) raises ``ValueError`` listing the studies that exist. Concurrent callers on a fresh
    storage are serialised (SQLite) or retried (other databases), never left with an
    ``IntegrityError``.
    """
    import optuna

    path = _sqlite_path(storage)
    if not create:
        if path is not None and not os.path.isfile(path):
            raise ValueError(f"no study database at {path}: start the search with `gransearch optimize --out DIR` first "
                             "(its storage is sqlite:///DIR/study.db)")
        st = _storage(storage)
        names = [s.study_name for s in optuna.get_all_study_summaries(st)]
        if study_name not in names:
            raise ValueError(f"no study named {study_name!r} in {storage}; the studies there: {names or 'none'}")
        return optuna.load_study(study_name=study_name, storage=st, sampler=sampler, pruner=pruner)
    last: Optional[Exception] = None
    for attempt in range(8):
        try:
            with storage_lock(storage):
                return optuna.create_study(study_name=study_name, storage=_storage(storage), sampler=sampler, pruner=pruner,
                                           direction="minimize", load_if_exists=True)
        except Exception as exc:  # a concurrent creator on a server database: try again, then load
            if not _is_race(exc):
                raise
            last = exc
            time.sleep(0.1 * (attempt + 1))
    raise RuntimeError(f"could not open study {study_name!r} in {storage} after 8 tries: {last}")


def _is_race(exc: Exception) -> bool:
    import optuna

    if isinstance(exc, optuna.exceptions.DuplicatedStudyError):
        return True
    try:
        from sqlalchemy.exc import IntegrityError, OperationalError
    except ImportError:  # pragma: no cover - optuna's RDB storage needs sqlalchemy
        return False
    return isinstance(exc, (IntegrityError, OperationalError))


def describe_changes(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Human-readable differences between two search records (nested dicts)."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += describe_changes(a, b, name + ".")
        elif isinstance(a, list) and isinstance(b, list):
            gone, added = [x for x in a if x not in b], [x for x in b if x not in a]
            parts = ([f"removed {_short(gone)}"] if gone else []) + ([f"added {_short(added)}"] if added else [])
            out.append(f"{name}: " + ("; ".join(parts) if parts else "reordered"))
        else:
            out.append(f"{name}: was {a!r}, now {b!r}")
    return out


def _short(items: list, n: int = 6) -> str:
    shown = ", ".join(map(str, items[:n]))
    return f"[{shown}{', ...' if len(items) > n else ''}] ({len(items)})"


def bind_study(study, record: dict, *, storage=None, extra_attrs: Optional[dict] = None) -> None:
    """Store ``record`` (what every trial value depends on) in a new study, or check it against
    the one stored; :class:`StudyMismatchError` names every difference and the way out.

    ``extra_attrs`` are stored on the study once the record matches (the CLI keeps its run
    configuration there for workers).
    """
    record = json.loads(json.dumps(record))  # as stored: lists, no tuples
    raw = study.user_attrs.get("search_record")
    where = f"study {study.study_name!r}" + (f" in {storage}" if isinstance(storage, str) else "")
    if raw is None:
        if any(t.state.is_finished() for t in study.get_trials(deepcopy=False)):
            raise StudyMismatchError(f"{where} holds trials from an older gransearch that recorded no search record, so its "
                                     "values cannot be trusted for this search: use a new --out (CLI) or study_name")
        study.set_user_attr("search_record", json.dumps(record, sort_keys=True))
    else:
        stored = json.loads(raw)
        if stored != record:
            changes = describe_changes(stored, record)
            raise StudyMismatchError(f"{where} was made for another search, so its trial values cannot be compared with this "
                                     f"one's. What changed: {'; '.join(changes)}. Use a new --out (CLI) or study_name, or the "
                                     "same model, data and options as before")
    for k, v in (extra_attrs or {}).items():
        study.set_user_attr(k, v)


def bind_file(path: str, record: dict, what: str = "results") -> None:
    """Bind a resumable results file (an ablation CSV) to what its rows depend on.

    The record is kept beside it as ``<path>.record.json``. A new file gets it; a file whose record
    differs raises :class:`StudyMismatchError` naming the changes, so rows measured on another model,
    calibration or evaluation slice are never mixed with new ones. A file from before records
    existed is adopted with a warning.
    """
    record = json.loads(json.dumps(record))
    side = f"{path}.record.json"
    if os.path.exists(side):
        try:
            with open(side, encoding="utf-8") as fh:
                stored = json.load(fh)
        except (OSError, ValueError) as exc:
            raise StudyMismatchError(f"{side} is not valid JSON ({exc}): remove it and {path}, or use another --out") from None
        if stored != record:
            raise StudyMismatchError(f"{path} holds {what} of another run, so its rows cannot be mixed with this one's. What "
                                     f"changed: {'; '.join(describe_changes(stored, record))}. Use another --out (out=...), or "
                                     "the same model, data and options as before")
        return
    if os.path.exists(path):
        log.warning("%s has no record of the run that wrote it; adopting it for this run (%s)", path, side)
    os.makedirs(os.path.dirname(os.path.abspath(side)), exist_ok=True)
    atomic_write(side, json.dumps(record, indent=1, sort_keys=True))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def fail_dead_trials(study) -> list[int]:
    """Mark FAILED the RUNNING trials whose worker process (on this host) no longer exists.

    Trials of workers on other hosts are left to Optuna's heartbeat (``GRACE_SECONDS``). Returns
    the trial numbers marked.
    """
    import optuna

    host = socket.gethostname()
    marked = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        w = t.user_attrs.get("worker")
        if not isinstance(w, str) or ":" not in w:
            continue
        h, _, pid = w.rpartition(":")
        if h != host or not pid.isdigit() or _pid_alive(int(pid)):
            continue
        try:
            if not study._storage.set_trial_state_values(t._trial_id, state=optuna.trial.TrialState.FAIL):
                continue
        except (RuntimeError, ValueError, optuna.exceptions.UpdateFinishedTrialError):  # finished meanwhile (its own worker, another's check)
            continue
        marked.append(t.number)
        retry_failed(study, study._storage.get_trial(t._trial_id))
    if marked:
        log.warning("marked %d trial(s) of dead workers as failed: %s", len(marked), marked)
    return marked


def enqueue_missing(study, uniform_keys: list[str], warm_params: dict[str, dict], seeds: Sequence[str] = ()) -> int:
    """Enqueue each warm start that has no complete, pruned, waiting or running trial yet.

    ``uniform_keys``: ``method:spec`` of the uniform baselines, in the order they should run;
    ``warm_params``: ``{name: fixed parameters}`` of the other warm starts; ``seeds``: names of
    given plans (the trial reads the plan by its name). Returns how many were
    enqueued (all of them for a new study; the lost ones on resume).
    """
    import optuna

    S = optuna.trial.TrialState
    live = (S.COMPLETE, S.PRUNED, S.WAITING, S.RUNNING)
    trials = study.get_trials(deepcopy=False, states=live)
    have_uniform = {t.user_attrs.get("uniform") for t in trials}
    have_warm = {t.user_attrs.get("warm") for t in trials}
    n = 0
    for key in uniform_keys:
        if key not in have_uniform:
            study.enqueue_trial({}, user_attrs={"uniform": key})
            n += 1
    for name, params in warm_params.items():
        if name not in have_warm:
            study.enqueue_trial(params, user_attrs={"warm": name})
            n += 1
    have_seed = {t.user_attrs.get("seed") for t in trials}
    for name in seeds:
        if name not in have_seed:
            study.enqueue_trial({}, user_attrs={"seed": name})
            n += 1
    return n


def retry_failed(study, trial) -> None:
    """Enqueue a failed trial once more with its parameters and user attributes (its warm-start or
    seed name included), so that the plan a dead worker was measuring is measured by another.
    A trial that was itself a retry is not retried again. Optuna's heartbeat calls this for trials
    of other hosts; :func:`fail_dead_trials` for this host's."""
    import optuna

    if "retry_of" in trial.system_attrs:
        return
    if any(t.system_attrs.get("retry_of") == trial.number for t in study.get_trials(deepcopy=False)):
        return  # already enqueued (two workers found the same dead trial)
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.WAITING, params=trial.params,
                                              distributions=trial.distributions, user_attrs=trial.user_attrs,
                                              system_attrs={"retry_of": trial.number}))
    log.warning("trial %d failed (worker %s gone); enqueued to run again", trial.number, trial.user_attrs.get("worker", "?"))


class _Heartbeat:
    """Records a running trial's heartbeat every ``HEARTBEAT_SECONDS`` from a thread (RDB storages)."""

    def __init__(self, study, trial):
        self.storage, self.trial_id = study._storage, trial._trial_id
        self.stop = threading.Event()
        self.thread = None
        if hasattr(self.storage, "get_heartbeat_interval") and self.storage.get_heartbeat_interval() is not None:
            self.storage.record_heartbeat(self.trial_id)
            self.thread = threading.Thread(target=self._beat, daemon=True)
            self.thread.start()

    def _beat(self) -> None:
        while not self.stop.wait(HEARTBEAT_SECONDS):
            self.storage.record_heartbeat(self.trial_id)

    def close(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join()


def check_workers(study, storage=None) -> None:
    """Fail the trials of dead workers: this host's by process id, others' by Optuna's heartbeat.

    Runs under :func:`storage_lock`, so two workers finding the same dead trial fail it and enqueue
    its retry once (SQLite has no row locks to make the read-then-write of a trial's state atomic)."""
    import optuna

    with storage_lock(storage):
        fail_dead_trials(study)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)


def run_trials(study, storage, objective: Callable, n_trials: int, *, timeout: Optional[float] = None,
               verbose: bool = True, on_start: Optional[Callable] = None) -> int:
    """Run ``objective(trial)`` until the study holds ``n_trials`` complete or pruned trials, whichever
    worker ran them; returns how many this process ran.

    A trial is taken (``study.ask()``, which pops enqueued ones first) under :func:`storage_lock` and
    only while complete + pruned + running trials number fewer than ``n_trials``; with none to take
    and some running elsewhere, the worker waits for them (one may fail and need running again).
    ``objective`` raising :class:`optuna.TrialPruned` prunes the trial; any other exception fails
    it and propagates. ``on_start(trial)`` runs first in each trial (the worker's name).
    """
    import optuna
    from tqdm.auto import tqdm

    S = optuna.trial.TrialState
    end = None if timeout is None else time.monotonic() + timeout
    ran = 0
    bar = tqdm(total=n_trials, desc="search", disable=not verbose)
    try:
        while end is None or time.monotonic() < end:
            check_workers(study, storage)
            with storage_lock(storage):
                states = [t.state for t in study.get_trials(deepcopy=False, states=(S.COMPLETE, S.PRUNED, S.RUNNING))]
                done = sum(s != S.RUNNING for s in states)
                with warnings.catch_warnings():  # Optuna expects its heartbeat under Study.optimize: _Heartbeat records it here
                    warnings.simplefilter("ignore", UserWarning)
                    trial = study.ask() if len(states) < n_trials else None
                if trial is not None and on_start is not None:
                    on_start(trial)
            bar.n = min(done, n_trials)
            bar.refresh()
            if done >= n_trials:
                break
            if trial is None:
                time.sleep(POLL_SECONDS)
                continue
            beat = _Heartbeat(study, trial)
            try:
                value = objective(trial)
            except optuna.TrialPruned:
                study.tell(trial, state=S.PRUNED)
            except BaseException:
                study.tell(trial, state=S.FAIL)
                raise
            else:
                study.tell(trial, value)
            finally:
                beat.close()
            ran += 1
    finally:
        bar.close()
    return ran
