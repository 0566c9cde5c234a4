"""The search space file: which TrainConfig keys a sweep fixes, which it searches, and how.

    [fixed]                       # TrainConfig keys, over the recipe's values
    epochs = 3
    [search]                      # each key: a range or a list of choices
    lr = { low = 1e-4, high = 1e-2, log = true }
    batch_size = { choices = [32, 64, 128] }
    "model_args.hidden" = { low = 64, high = 512, step = 64 }
    [sweep]                       # optional study settings; flags override them
    recipe = "lab"                # the recipe under [fixed]
    trials = 20
    sampler = "tpe"               # tpe, random or grid
    pruner = "median"             # median, hyperband or none
    seed = 0                      # the sampler's
    startup_trials = 5            # trials before TPE models the space and the pruner prunes

Every problem is one line naming the file and the key. The values are TrainConfig's: a space is
checked by building the config of every corner of it (each range's ends, each choice) through
`resolve_config`, the same validation every run goes through, before anything is created.
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..config import RECIPES, TrainConfig, resolve_config, toml_module
from ..errors import MnistlabError

TABLES = ("fixed", "search", "sweep")
SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("median", "hyperband", "none")
# The lab's validation split, 50,000 / 10,000, where neither the recipe nor the space sets one.
DEFAULT_VAL_SPLIT = 1 / 6
# Keys a sweep sets itself: trials never see the test set; the recipe comes from --recipe.
RESERVED = {"eval_test": "a sweep's trials never see the test set",
            "recipe": "give it as recipe in [sweep], or with --recipe"}  # fmt: skip
MAX_CORNERS = 512  # corners of the space validated up front (the rest are checked per trial)
BUNDLED = Path(__file__).resolve().parent.parent / "spaces"

FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


@dataclasses.dataclass(frozen=True)
class Settings:
    """A study's settings: the [sweep] table, with the flags over it."""

    recipe: str = "lab"
    trials: int = 20
    sampler: str = "tpe"
    pruner: str = "median"
    seed: int = 0
    startup_trials: int = 5


@dataclasses.dataclass(frozen=True)
class Param:
    """One searched key: a float or int range, or a list of choices."""

    key: str  # a TrainConfig field, or "model_args.NAME"
    kind: str  # "float", "int" or "choice"
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple[Any, ...] = ()

    def suggest(self, trial: Any) -> Any:
        """This key's value for an Optuna trial."""
        if self.kind == "float":
            return trial.suggest_float(self.key, self.low, self.high, log=self.log, step=self.step)
        if self.kind == "int":
            return trial.suggest_int(self.key, self.low, self.high, log=self.log,
                                     step=self.step or 1)  # fmt: skip
        encoded = [_encode(c) for c in self.choices]
        return _decode(trial.suggest_categorical(self.key, encoded))

    def grid(self) -> list[Any] | None:
        """The values a grid sampler visits, as Optuna sees them; None for a continuous range."""
        if self.kind == "choice":
            return [_encode(c) for c in self.choices]
        if self.kind == "int":
            return list(range(int(self.low), int(self.high) + 1, int(self.step or 1)))
        if self.step is None:
            return None
        n = round((self.high - self.low) / self.step)
        return [self.low + i * self.step for i in range(n + 1)]

    def corners(self) -> tuple[Any, ...]:
        return self.choices if self.kind == "choice" else (self.low, self.high)

    def describe(self) -> str:
        if self.kind == "choice":
            return f"{self.key} in {list(self.choices)}"
        extra = ", log" if self.log else f", step {self.step}" if self.step else ""
        return f"{self.key} in [{self.low}, {self.high}{extra}]"


def _encode(value: Any) -> Any:
    # Optuna's choices are None, bool, int, float or str: lists (a model's widths) go as JSON.
    return json.dumps(value) if isinstance(value, list) else value


def _decode(value: Any) -> Any:
    if isinstance(value, str) and value.startswith("["):
        return json.loads(value)
    return value


@dataclasses.dataclass(frozen=True)
class Space:
    """A parsed space file."""

    path: str
    text: str
    fixed: Mapping[str, Any]  # flat keys, "model_args.NAME" included
    search: tuple[Param, ...]
    settings: Settings

    def config(self, recipe: str, values: Mapping[str, Any] | None = None) -> TrainConfig:
        """The TrainConfig of one trial: the recipe, the fixed keys, then `values` (searched
        keys), with a validation split and without the test set."""
        plain: dict[str, Any] = {}
        model_args: dict[str, Any] = {}
        for key, value in {**self.fixed, **(values or {})}.items():
            if key.startswith("model_args."):
                model_args[key.removeprefix("model_args.")] = value
            else:
                plain[key] = value
        if "val_split" not in plain and not RECIPES[recipe].overrides.get("val_split"):
            plain["val_split"] = DEFAULT_VAL_SPLIT
        plain["eval_test"] = False
        cfg = resolve_config(recipe, config=plain, model_args=model_args)
        if not cfg.val_split:
            raise MnistlabError(f"{self.path}: a sweep chooses on a validation split; "
                                "val_split must be above 0 (the default is the lab's 1/6)")
        return cfg

    def check(self, recipe: str) -> None:
        """Validate the fixed keys and the corners of the space as TrainConfigs."""
        if recipe not in RECIPES:
            raise MnistlabError(f"unknown recipe {recipe!r}; choose one of: {', '.join(RECIPES)}")
        _check_model_args(self, recipe)
        sets = [[(p.key, v) for v in p.corners()] for p in self.search]
        count = math.prod(len(s) for s in sets)
        combos = itertools.product(*sets) if count <= MAX_CORNERS else (
            [pair] for s in sets for pair in s)  # each value on its own  # fmt: skip
        for combo in combos:
            values = dict(combo)
            try:
                self.config(recipe, values)
            except MnistlabError as e:
                shown = ", ".join(f"{k}={v!r}" for k, v in values.items())
                where = f" (at {shown})" if shown else ""
                message = str(e).removeprefix(f"{self.path}: ")
                raise MnistlabError(f"{self.path}{where}: {message}") from None

    def grid(self) -> dict[str, list[Any]]:
        """The grid sampler's search space; one clear error if a range is continuous."""
        out = {}
        for p in self.search:
            values = p.grid()
            if values is None:
                raise MnistlabError(f"{self.path}: --sampler grid needs choices or stepped ranges; "
                                    f"give search.{p.key} a step, or list its choices")
            out[p.key] = values
        return out

    def describe(self) -> str:
        return "; ".join(p.describe() for p in self.search)


def find_space(name: str | Path) -> Path:
    """A space file by path, or by the name of one that ships with mnistlab (lab-mlp, fast)."""
    path = Path(name)
    if path.is_file():
        return path
    bundled = BUNDLED / f"{path.name.removesuffix('.toml')}.toml"
    if path.parent == Path(".") and bundled.is_file():
        return bundled
    names = ", ".join(sorted(p.stem for p in BUNDLED.glob("*.toml")))
    raise MnistlabError(f"--space {name}: no such file (the bundled spaces are: {names})")


def read_space(name: str | Path) -> Space:
    path = find_space(name)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise MnistlabError(f"{path}: cannot read it ({getattr(e, 'strerror', None) or e})"
                            ) from None
    return parse_space(text, str(path))


def parse_space(text: str, path: str = "space.toml") -> Space:
    """A Space from TOML text; one MnistlabError line naming `path` and the key otherwise."""
    tomllib = toml_module()

    def bad(message: str) -> MnistlabError:
        return MnistlabError(f"{path}: {message}")

    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise bad(f"not valid TOML ({e})") from None
    unknown = sorted(set(doc) - set(TABLES))
    if unknown:
        raise bad(f"unknown table{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
                  "a space has [fixed], [search] and [sweep]")
    for table in TABLES:
        if not isinstance(doc.get(table, {}), dict):
            raise bad(f"{table} must be a table ([{table}])")
    fixed = _flatten(doc.get("fixed", {}), "fixed", bad)
    raw_search = _flatten(doc.get("search", {}), "search", bad)
    if not raw_search:
        raise bad("[search] is empty: name at least one key to search")
    for key in (*fixed, *raw_search):
        _check_key(key, bad)
    both = sorted(set(fixed) & set(raw_search))
    if both:
        raise bad(f"{', '.join(both)} both fixed and searched; keep one")
    search = tuple(_param(key, spec, bad) for key, spec in raw_search.items())
    settings = _settings(doc.get("sweep", {}), path)
    return Space(path, text, fixed, search, settings)


def _flatten(table: dict[str, Any], where: str, bad: Any) -> dict[str, Any]:
    """`model_args = { hidden = 64 }` and `"model_args.hidden" = 64` alike → flat keys."""
    out: dict[str, Any] = {}
    for key, value in table.items():
        if key == "model_args":
            if not isinstance(value, dict):
                raise bad(f"{where}.model_args must be a table of model arguments")
            for name, v in value.items():
                out[f"model_args.{name}"] = v
        else:
            out[key] = value
    return out


def _check_key(key: str, bad: Any) -> None:
    if key in RESERVED:
        raise bad(f"{key} cannot be set in a space: {RESERVED[key]}")
    if key.startswith("model_args."):
        if not key.removeprefix("model_args.").isidentifier():
            raise bad(f"{key!r}: a model argument is model_args.NAME")
        return
    if key not in FIELDS:
        raise bad(f"unknown key {key!r}; the keys are TrainConfig's (see `mnistlab train --help`) "
                  "or model_args.NAME")


def _field_type(key: str) -> type | None:
    """The Python type of a TrainConfig field (None for model arguments: any JSON value)."""
    if key.startswith("model_args."):
        return None
    return type(FIELDS[key].default)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _param(key: str, spec: Any, bad: Any) -> Param:
    where = f"search.{key}"
    if not isinstance(spec, dict):
        raise bad(f"{where} must be a range {{ low = ..., high = ... }} or "
                  f"{{ choices = [...] }}, got {spec!r}")
    kind = _field_type(key)
    if "choices" in spec:
        extra = sorted(set(spec) - {"choices"})
        if extra:
            raise bad(f"{where}: choices take no {', '.join(extra)}")
        choices = spec["choices"]
        if not isinstance(choices, list) or not choices:
            raise bad(f"{where}: choices must be a non-empty list")
        for c in choices:
            wrong = not _number(c) if kind is float else kind is not None and type(c) is not kind
            if wrong:
                raise bad(f"{where}: {c!r} is not a{'n' if kind is int else ''} "
                          f"{kind.__name__}")  # type: ignore[union-attr]
            if kind is None and not (isinstance(c, bool | str | list) or _number(c)):
                raise bad(f"{where}: {c!r} is not a number, string, boolean or list")
        encoded = [json.dumps(c, sort_keys=True) for c in choices]
        if len(set(encoded)) < len(encoded):
            raise bad(f"{where}: choices repeat a value")
        return Param(key, "choice", choices=tuple(choices))
    unknown = sorted(set(spec) - {"low", "high", "log", "step"})
    if unknown or "low" not in spec or "high" not in spec:
        raise bad(f"{where}: a range is {{ low = ..., high = ...[, log = true | step = ...] }}"
                  + (f"; unknown {', '.join(unknown)}" if unknown else ""))
    low, high, log, step = spec["low"], spec["high"], spec.get("log", False), spec.get("step")
    if kind in (bool, str):
        raise bad(f"{where}: {key} is a {kind.__name__}; list its choices instead of a range")
    for name, v in (("low", low), ("high", high)) + ((("step", step),) if step is not None else ()):
        if not _number(v) or not math.isfinite(v):
            raise bad(f"{where}: {name} must be a number, got {v!r}")
    if not isinstance(log, bool):
        raise bad(f"{where}: log must be true or false, got {log!r}")
    integer = kind is int or (kind is None and all(isinstance(v, int) for v in (low, high))
                              and (step is None or isinstance(step, int)))  # fmt: skip
    if kind is int and not all(isinstance(v, int) for v in (low, high, step or 1)):
        raise bad(f"{where}: {key} is an integer; low, high and step must be integers")
    if not low < high:
        raise bad(f"{where}: empty range: low ({low}) must be below high ({high})")
    if log and low <= 0:
        raise bad(f"{where}: a log range needs low above 0, got {low}")
    if log and step is not None:
        raise bad(f"{where}: a range is either log or stepped, not both")
    if step is not None and not 0 < step <= high - low:
        raise bad(f"{where}: step must be above 0 and at most high - low, got {step}")
    if step is not None and not math.isclose((high - low) / step, round((high - low) / step),
                                             rel_tol=0, abs_tol=1e-9):  # fmt: skip
        raise bad(f"{where}: high - low ({high - low:g}) must be a multiple of step ({step})")
    if integer:
        return Param(key, "int", int(low), int(high), log, step)
    return Param(key, "float", float(low), float(high), log,
                 float(step) if step is not None else None)  # fmt: skip


def _settings(table: dict[str, Any], path: str) -> Settings:
    def bad(message: str) -> MnistlabError:
        return MnistlabError(f"{path}: {message}")

    fields = {f.name: f for f in dataclasses.fields(Settings)}
    unknown = sorted(set(table) - set(fields))
    if unknown:
        raise bad(f"unknown [sweep] key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
                  f"the keys are: {', '.join(fields)}")
    values = {}
    for key, value in table.items():
        want = type(fields[key].default)
        if type(value) is not want:
            raise bad(f"sweep.{key} must be a{'n' if want is int else ''} {want.__name__}, "
                      f"got {value!r}")
        values[key] = value
    return check_settings(Settings(**values), where=f"{path}: sweep.")


def check_settings(s: Settings, where: str = "--") -> Settings:
    """One clear line for a setting out of range; `where` prefixes the key (a file, or --)."""
    if s.recipe not in RECIPES:
        raise MnistlabError(f"{where}recipe: unknown recipe {s.recipe!r}; choose one of: "
                            f"{', '.join(RECIPES)}")
    if s.trials < 1:
        raise MnistlabError(f"{where}trials must be at least 1, got {s.trials}")
    if s.sampler not in SAMPLERS:
        raise MnistlabError(f"{where}sampler: unknown sampler {s.sampler!r}; choose one of: "
                            f"{', '.join(SAMPLERS)}")
    if s.pruner not in PRUNERS:
        raise MnistlabError(f"{where}pruner: unknown pruner {s.pruner!r}; choose one of: "
                            f"{', '.join(PRUNERS)}")
    if s.startup_trials < 0 or s.seed < 0:
        raise MnistlabError(f"{where}seed and startup_trials must not be negative")
    return s


def _check_model_args(space: Space, recipe: str) -> None:
    """Model argument names must be parameters of the model (of every model searched)."""
    from ..models import MODELS

    def bad(message: str) -> MnistlabError:
        return MnistlabError(f"{space.path}: {message}")

    names = [k.removeprefix("model_args.") for k in (*space.fixed, *(p.key for p in space.search))
             if k.startswith("model_args.")]  # fmt: skip
    if not names:
        return
    model_param = next((p for p in space.search if p.key == "model"), None)
    default = space.fixed.get("model") or RECIPES[recipe].overrides.get("model", "mlp")
    models: Sequence[Any] = model_param.choices if model_param else [default]
    for model in models:
        if model not in MODELS:
            return  # the corners name the unknown model
        accepted = inspect.signature(MODELS[model].cls).parameters
        for name in names:
            if name not in accepted:
                known = ", ".join(accepted) or "none"
                raise bad(f"model {model!r} has no argument {name!r} (its arguments: {known})")
