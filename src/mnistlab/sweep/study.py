"""A sweep's study: Optuna's RDB storage (SQLite by default, any database URL Optuna takes) with
heartbeats, the samplers and pruners by name, and the tally of trials the workers and the
commands read.

    runs/<sweep>/sweep.json   name and storage URL (its password left out), for the commands
    runs/<sweep>/study.db     the study, unless --storage names another database
    runs/<sweep>/trial-<n>/   each trial's run folder

The study itself keeps what every worker on every machine needs: the space file's text and the
settings (the study's user attribute "mnistlab").
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .. import runs
from ..errors import MnistlabError
from ..fileio import atomic_write_json
from .space import Settings, Space, check_settings, parse_space

SWEEP_FILE = "sweep.json"
STUDY_DB = "study.db"
ATTR = "mnistlab"
# A worker beats every HEARTBEAT seconds while it runs a trial; a trial whose beats stopped
# GRACE_BEATS beats ago is failed and retried (Optuna's heartbeat and stale-trial retry).
HEARTBEAT = 10
GRACE_BEATS = 3
MAX_RETRIES = 3  # a trial whose worker dies this many times is left failed


@contextlib.contextmanager
def quiet_optuna() -> Iterator[None]:
    """Optuna's experimental-feature warnings (heartbeats, retries, matplotlib plots) are noise
    here: mnistlab chose those features and documents them."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


def check_name(name: str) -> str:
    if not name or "/" in name or name in (".", "..") or name.startswith("-"):
        raise MnistlabError(f"bad sweep name {name!r}: use a plain folder name")
    return name


def default_url(folder: Path) -> str:
    return f"sqlite:///{(folder / STUDY_DB).resolve()}"


def shown_url(url: str) -> str:
    """`url` with its password masked, for messages."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # an unparsable URL: show only its scheme
        return url.split("://", 1)[0] + "://…"


def _without_password(url: str) -> str:
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    return parsed.set(password=None).render_as_string(hide_password=False)


def _driver_url(url: str) -> str:
    """SQLAlchemy 2.1 made psycopg 3 the driver of a bare postgresql:// URL; mnistlab's postgres
    extra installs psycopg2 (psycopg2-binary), so a URL that names no driver gets that one
    unless psycopg 3 is there."""
    if not url.startswith("postgresql://"):
        return url
    import importlib.util

    if importlib.util.find_spec("psycopg") is not None:
        return url
    return "postgresql+psycopg2://" + url.removeprefix("postgresql://")


def open_storage(url: str, heartbeat: int = HEARTBEAT) -> Any:
    """Optuna's RDBStorage on `url`, with heartbeats and the stale-trial retry; one clear line
    if the database cannot be reached or the URL is not one."""
    import optuna
    import sqlalchemy.exc
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        engine_kwargs = {"connect_args": {"timeout": 60}}  # several worker processes write
    elif url.startswith("postgresql"):
        engine_kwargs = {"connect_args": {"connect_timeout": 10}}
    try:
        with quiet_optuna():
            return RDBStorage(
                _driver_url(url), engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat,
                grace_period=GRACE_BEATS * heartbeat,
                heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(
                    max_retry=MAX_RETRIES),
            )  # fmt: skip
    except ImportError:
        scheme = url.split("://", 1)[0]
        raise MnistlabError(
            f"--storage {shown_url(url)}: no database driver for {scheme!r} is installed "
            "(PostgreSQL: pip install 'mnistlab[postgres]'; MySQL: pip install pymysql and use "
            "mysql+pymysql://)"
        ) from None
    except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError,
            ValueError) as e:  # fmt: skip
        raise MnistlabError(f"cannot open the study database {shown_url(url)}: {_reason(e)}"
                            ) from None


def _reason(e: BaseException) -> str:
    orig = getattr(e, "orig", None) or e
    lines = [line.strip() for line in str(orig).strip().splitlines() if line.strip()]
    return (lines[0] if lines else type(e).__name__)[:300]


def make_sampler(s: Settings, space: Space, seed: int) -> Any:
    import optuna

    with quiet_optuna():
        if s.sampler == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        if s.sampler == "grid":
            return optuna.samplers.GridSampler(space.grid(), seed=seed)
        # constant_liar: a worker's pick sees the trials others are running as bad guesses, so
        # workers do not all try the same point.
        return optuna.samplers.TPESampler(n_startup_trials=s.startup_trials, seed=seed,
                                          constant_liar=True)  # fmt: skip


def make_pruner(s: Settings, epochs: int) -> Any:
    import optuna

    if s.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=s.startup_trials, n_warmup_steps=0)
    if s.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(1, epochs))
    return optuna.pruners.NopPruner()


@dataclasses.dataclass
class Sweep:
    """An open sweep: its folder, its study and what the study was made with."""

    name: str
    folder: Path
    url: str
    storage: Any
    study: Any
    space: Space
    settings: Settings
    heartbeat: int

    @property
    def epochs(self) -> int:
        return self.space.config(self.settings.recipe).epochs

    def use_sampler(self, seed: int) -> None:
        """This process's sampler (a seed of its own: workers must not draw the same points)."""
        self.study.sampler = make_sampler(self.settings, self.space, seed)


def _attrs(space: Space, settings: Settings) -> dict[str, Any]:
    return {"space": space.text, "space_path": space.path,
            "settings": dataclasses.asdict(settings), "direction": "val_acc",
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}  # fmt: skip


def open_sweep(
    name: str,
    *,
    runs_dir: str | Path = runs.RUNS_DIR,
    space: Space | None = None,
    flags: dict[str, Any] | None = None,
    storage: str | None = None,
    heartbeat: int = HEARTBEAT,
    create: bool = False,
) -> Sweep:
    """Open sweep `name`: create its study (`create`, with a `space`), or load it and check that
    `space` and `flags` (recipe, trials, sampler, pruner) agree with what it was made with.

    Nothing is left behind when this fails: a folder it made is removed again.
    """
    import optuna

    check_name(name)
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # mnistlab prints its own lines
    if create and space is not None:  # before anything is made
        settings = check_settings(dataclasses.replace(space.settings, **(flags or {})))
        space.check(settings.recipe)
        if settings.sampler == "grid":
            space.grid()
    folder = Path(runs_dir) / name
    url = storage or _recorded_url(folder) or default_url(folder)
    made_folder = False
    if url.startswith("sqlite") and not folder.is_dir():
        if not create:
            raise MnistlabError(f"no sweep {name!r} in {runs_dir} (no {folder / SWEEP_FILE}); "
                                "check the name, or give --storage URL")
        try:
            folder.mkdir(parents=True)
        except OSError as e:
            raise MnistlabError(f"cannot create {folder}: {e.strerror or e}") from None
        made_folder = True
    try:
        sweep = _open(name, folder, url, space, flags or {}, heartbeat, create)
        if create:
            _record(folder, name, url)
    except BaseException:
        if made_folder:
            import shutil

            shutil.rmtree(folder, ignore_errors=True)
        raise
    return sweep


def _recorded_url(folder: Path) -> str | None:
    path = folder / SWEEP_FILE
    if not path.is_file():
        return None
    record = runs.read_json(path)
    url = record.get("storage") if isinstance(record, dict) else None
    if not isinstance(url, str):
        raise MnistlabError(f"{path} is unreadable (no storage URL)")
    return url


def _record(folder: Path, name: str, url: str) -> None:
    path = folder / SWEEP_FILE
    if path.is_file():
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, {"name": name, "storage": _without_password(url),
                                 "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})  # fmt: skip
    except OSError as e:
        raise MnistlabError(f"cannot write {path}: {e.strerror or e}") from None


def _open(name: str, folder: Path, url: str, space: Space | None, flags: dict[str, Any],
          heartbeat: int, create: bool) -> Sweep:  # fmt: skip
    import optuna

    storage = open_storage(url, heartbeat)
    with quiet_optuna():
        try:
            study = optuna.load_study(study_name=name, storage=storage)
        except KeyError:
            study = None
    if study is None:
        if not create:
            raise MnistlabError(f"no sweep {name!r} in the study database {shown_url(url)}")
        if space is None:
            raise MnistlabError(f"sweep {name!r} is new: give its search space with --space FILE")
        settings = check_settings(dataclasses.replace(space.settings, **flags))
        with quiet_optuna():
            study = optuna.create_study(study_name=name, storage=storage, direction="maximize",
                                        load_if_exists=True)  # fmt: skip
        if ATTR not in study.user_attrs:  # another machine may have won the race to create it
            study.set_user_attr(ATTR, _attrs(space, settings))
    attrs = study.user_attrs.get(ATTR)
    if not isinstance(attrs, dict) or "space" not in attrs:
        raise MnistlabError(f"study {name!r} in {shown_url(url)} was not made by mnistlab sweep")
    stored = parse_space(attrs["space"], attrs.get("space_path", "space.toml"))
    settings = Settings(**attrs["settings"])
    if space is not None and _shape(space) != _shape(stored):
        raise MnistlabError(
            f"sweep {name!r} was made with another search space ({attrs.get('space_path')}); "
            "rerun it without --space, or start a sweep under a new name"
        )
    changed = {k: v for k, v in flags.items() if k != "trials" and getattr(settings, k) != v}
    if changed:
        made = ", ".join(f"{k} {getattr(settings, k)!r}" for k in changed)
        raise MnistlabError(f"sweep {name!r} was made with {made}; rerun it without those flags, "
                            "or start a sweep under a new name")
    if "trials" in flags and flags["trials"] != settings.trials:
        settings = check_settings(dataclasses.replace(settings, trials=flags["trials"]))
        study.set_user_attr(ATTR, {**attrs, "settings": dataclasses.asdict(settings)})
    if settings.sampler == "grid":  # a grid has as many trials as points
        points = math.prod(len(v) for v in stored.grid().values())
        settings = dataclasses.replace(settings, trials=min(settings.trials, points))
    study.pruner = make_pruner(settings, stored.config(settings.recipe).epochs)
    return Sweep(name, folder, url, storage, study, stored, settings, heartbeat)


def _shape(space: Space) -> str:
    return json.dumps([dict(space.fixed), [dataclasses.asdict(p) for p in space.search]],
                      sort_keys=True, default=str)  # fmt: skip


# --- counting trials ----------------------------------------------------------------------------


def is_retry(trial: Any) -> bool:
    """Whether a trial re-runs another whose worker died (Optuna's retry callback marks it)."""
    return "failed_trial" in trial.system_attrs


def is_surplus(trial: Any) -> bool:
    return bool(trial.user_attrs.get("surplus"))


@dataclasses.dataclass
class Tally:
    """Where a study stands: `fresh` counts the trials of the budget (retries and surplus
    trials are not new trials)."""

    total: int = 0
    fresh: int = 0
    complete: int = 0
    pruned: int = 0
    failed: int = 0
    retried: int = 0  # failed trials whose worker died, run again as a later trial
    running: int = 0
    waiting: int = 0
    surplus: int = 0

    def done(self, trials: int) -> bool:
        return self.fresh >= trials and not self.running and not self.waiting

    def line(self) -> str:
        parts = [f"{self.complete} complete", f"{self.pruned} pruned"]
        if self.failed:
            retried = f" ({self.retried} retried)" if self.retried else ""
            parts.append(f"{self.failed} failed{retried}")
        if self.running:
            parts.append(f"{self.running} running")
        if self.waiting:
            parts.append(f"{self.waiting} waiting")
        if self.surplus:
            parts.append(f"{self.surplus} not run (the study was full)")
        return f"{self.total} trials: " + ", ".join(parts)


def retried_numbers(trials: list[Any]) -> set[int]:
    """Numbers of the failed trials that a later trial retries."""
    out: set[int] = set()
    for t in trials:
        out.update(t.system_attrs.get("retry_history", []))
    return out


def tally(study: Any) -> Tally:
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    t = Tally(total=len(trials))
    again = retried_numbers(trials)
    for trial in trials:
        if is_surplus(trial):
            t.surplus += 1
            continue
        if not is_retry(trial):
            t.fresh += 1
        if trial.state == TrialState.COMPLETE:
            t.complete += 1
        elif trial.state == TrialState.PRUNED:
            t.pruned += 1
        elif trial.state == TrialState.FAIL:
            t.failed += 1
            t.retried += trial.number in again
        elif trial.state == TrialState.RUNNING:
            t.running += 1
        elif trial.state == TrialState.WAITING:
            t.waiting += 1
    return t
