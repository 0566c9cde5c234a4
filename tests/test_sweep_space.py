"""The search space file: parsing, one-line errors, trial configs, and Optuna's suggestions
staying inside what the file says (hypothesis properties at the boundary)."""

from __future__ import annotations

import json
import math

import optuna
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mnistlab.errors import MnistlabError
from mnistlab.sweep.space import BUNDLED, DEFAULT_VAL_SPLIT, parse_space, read_space

optuna.logging.set_verbosity(optuna.logging.ERROR)

GOOD = """
[fixed]
epochs = 3
val_split = 0.1667          # the lab's 50,000 / 10,000
[search]
lr = { low = 1e-4, high = 1e-2, log = true }
batch_size = { choices = [32, 64, 128] }
weight_decay = { low = 0.0, high = 1e-3 }
"model_args.hidden" = { choices = [64, 128, 256] }
"""


def space_error(text: str) -> str:
    with pytest.raises(MnistlabError) as e:
        parse_space(text, "s.toml").check("lab")
    message = str(e.value)
    assert "\n" not in message and message.startswith("s.toml"), message
    return message


def test_the_issue_example_parses_into_fixed_keys_and_params():
    space = parse_space(GOOD, "s.toml")
    space.check("lab")
    assert dict(space.fixed) == {"epochs": 3, "val_split": 0.1667}
    kinds = {p.key: (p.kind, p.low, p.high, p.log, p.choices) for p in space.search}
    assert kinds == {
        "lr": ("float", 1e-4, 1e-2, True, ()),
        "batch_size": ("choice", None, None, False, (32, 64, 128)),
        "weight_decay": ("float", 0.0, 1e-3, False, ()),
        "model_args.hidden": ("choice", None, None, False, (64, 128, 256)),
    }
    cfg = space.config("lab", {"lr": 0.003, "batch_size": 128, "weight_decay": 0.0,
                               "model_args.hidden": 256})  # fmt: skip
    assert (cfg.lr, cfg.batch_size, cfg.epochs, cfg.val_split) == (0.003, 128, 3, 0.1667)
    assert cfg.model_args == {"hidden": 256} and cfg.model == "mlp"
    assert cfg.eval_test is False  # trials never see the test set


def test_a_trial_without_a_validation_split_gets_the_labs():
    space = parse_space("[search]\nlr = { low = 1e-4, high = 1e-2 }\n")
    cfg = space.config("lab", {"lr": 1e-3})
    assert cfg.val_split == DEFAULT_VAL_SPLIT  # 10,000 of 60,000
    assert round(60000 * cfg.val_split) == 10000
    assert space.config("robust", {"lr": 1e-3}).val_split == 0.1  # the recipe's own split
    assert "val_split must be above 0" in space_error(
        "[fixed]\nval_split = 0.0\n[search]\nlr = { low = 1e-4, high = 1e-2 }\n")


def test_model_args_as_a_table_or_dotted_keys():
    a = parse_space('[fixed]\nmodel_args = { depth = 2 }\n[search]\n'
                    '"model_args.hidden" = { low = 32, high = 256, step = 32 }\n')
    (p,) = a.search
    assert (p.kind, p.low, p.high, p.step) == ("int", 32, 256, 32)
    assert p.grid() == [32, 64, 96, 128, 160, 192, 224, 256]
    assert a.config("lab", {"model_args.hidden": 64}).model_args == {"depth": 2, "hidden": 64}


def test_sweep_settings_table():
    space = parse_space('[search]\nlr = { low = 1e-4, high = 1e-2 }\n[sweep]\ntrials = 7\n'
                        'sampler = "random"\npruner = "none"\nseed = 3\nstartup_trials = 1\n')
    s = space.settings
    assert (s.trials, s.sampler, s.pruner, s.seed, s.startup_trials) == (7, "random", "none", 3, 1)


@pytest.mark.parametrize(("text", "fragment"), [
    ("[serch]\nlr = { low = 1, high = 2 }\n", "unknown table serch"),
    ("[search]\nlrr = { low = 1e-4, high = 1e-2 }\n", "unknown key 'lrr'"),
    ("[fixed]\nepoch = 3\n[search]\nlr = { low = 1e-4, high = 1e-2 }\n", "unknown key 'epoch'"),
    ("[search]\nlr = { low = 1e-2, high = 1e-2 }\n", "empty range"),
    ("[search]\nlr = { low = 1e-2, high = 1e-4 }\n", "empty range"),
    ("[search]\nbatch_size = { choices = [] }\n", "non-empty list"),
    ("[search]\nlr = { low = 'a', high = 1 }\n", "low must be a number"),
    ("[search]\nbatch_size = { low = 16.5, high = 64 }\n", "must be integers"),
    ("[search]\nbatch_size = { choices = [32, 'big'] }\n", "'big' is not an int"),
    ("[search]\nlr = { low = 1e-4, high = 1e-2, lg = true }\n", "unknown lg"),
    ("[search]\nlr = { low = 0.0, high = 1e-2, log = true }\n", "log range needs low above 0"),
    ("[search]\nlr = 0.01\n", "must be a range"),
    ("[search]\nbatch_size = { low = 32, high = 100, step = 32 }\n", "multiple of step"),
    ("[search]\nlr = { low = 0.0, high = 1e-2 }\n", "(at lr=0.0)"),
    ("[search]\noptimizer = { choices = ['adam', 'lion'] }\n", "lion"),
    ("[search]\nmodel = { low = 1, high = 2 }\n", "list its choices"),
    ("[fixed]\nlr = 0.1\n[search]\nlr = { low = 1e-4, high = 1e-2 }\n", "both fixed and searched"),
    ("[fixed]\neval_test = true\n[search]\nlr = { low = 1e-4, high = 1e-2 }\n", "never see"),
    ("[search]\n\"model_args.width\" = { choices = [1, 2] }\n", "no argument 'width'"),
    ("[search]\nlr = { low = 1e-4, high = 1e-2 }\n[sweep]\ntrials = 0\n", "trials must be"),
    ("[search]\nlr = { low = 1e-4, high = 1e-2 }\n[sweep]\nsampler = 'cmaes'\n", "cmaes"),
    ("[search]\nlr = { low = 1e-4, high = 1e-2 }\n[sweep]\ntrials = '5'\n", "must be an int"),
    ("[search]\nlr = { low = 1e-4, high = 1e-2 }\n[sweep]\nworkers = 2\n", "unknown [sweep] key"),
    ("[fixed]\nepochs = 2\n", "[search] is empty"),
    ("[search\nlr = 1\n", "not valid TOML"),
])  # fmt: skip
def test_bad_space_files_are_one_line_naming_the_key(text, fragment):
    assert fragment in space_error(text)


def test_bundled_spaces_parse_and_check():
    names = sorted(p.stem for p in BUNDLED.glob("*.toml"))
    assert names == ["fast", "lab-mlp"]
    lab = read_space("lab-mlp")
    lab.check(lab.settings.recipe)
    assert {p.key for p in lab.search} == {
        "model_args.hidden", "model_args.depth", "model_args.dropout", "lr", "weight_decay",
        "batch_size"}  # fmt: skip
    assert lab.fixed["epochs"] == 5 and lab.settings.recipe == "lab"
    fast = read_space("fast")
    fast.check(fast.settings.recipe)
    cfg = fast.config("fast", {"lr": 0.01, "weight_decay": 1e-4, "label_smoothing": 0.1,
                               "batch_size": 128, "model_args.widths": [24, 48, 96]})
    assert cfg.model == "fastcnn" and cfg.model_args == {"widths": [24, 48, 96]}
    with pytest.raises(MnistlabError, match="bundled spaces are: fast, lab-mlp"):
        read_space("nope")


# ---- properties ---------------------------------------------------------------------------------

finite = st.floats(min_value=1e-6, max_value=1e3, allow_nan=False, allow_infinity=False)


def suggested(space, seed: int) -> dict:
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    trial = study.ask()
    return {p.key: p.suggest(trial) for p in space.search}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(low=finite, span=st.floats(min_value=1e-6, max_value=1e3), log=st.booleans(),
       seed=st.integers(0, 10_000))  # fmt: skip
def test_any_float_range_suggests_inside_it(low, span, log, seed):
    high = low + span
    if not low < high:
        return
    space = parse_space(f"[search]\nweight_decay = {{ low = {low!r}, high = {high!r}, "
                        f"log = {str(log).lower()} }}\n")  # fmt: skip
    (p,) = space.search
    assert (p.low, p.high, p.log) == (low, high, log)
    value = suggested(space, seed)["weight_decay"]
    assert low <= value <= high


@settings(max_examples=60, deadline=None)
@given(low=st.integers(1, 500), steps=st.integers(1, 40), step=st.integers(1, 50),
       seed=st.integers(0, 10_000))  # fmt: skip
def test_any_int_range_suggests_a_step_inside_it(low, steps, step, seed):
    high = low + steps * step
    space = parse_space(f"[search]\nbatch_size = {{ low = {low}, high = {high}, step = {step} }}")
    value = suggested(space, seed)["batch_size"]
    assert low <= value <= high and (value - low) % step == 0
    assert value in space.search[0].grid()


@settings(max_examples=60, deadline=None)
@given(low=st.floats(allow_nan=False, allow_infinity=False, width=32),
       high=st.floats(allow_nan=False, allow_infinity=False, width=32))  # fmt: skip
def test_a_range_whose_low_is_not_below_its_high_is_refused(low, high):
    text = f"[search]\nweight_decay = {{ low = {low!r}, high = {high!r} }}\n"
    if low < high:
        parse_space(text)
    else:
        with pytest.raises(MnistlabError, match="empty range"):
            parse_space(text)


scalars = st.one_of(st.integers(-10**6, 10**6), st.floats(allow_nan=False, allow_infinity=False),
                    st.booleans(), st.text(max_size=8))  # fmt: skip
values = st.one_of(scalars, st.lists(scalars, max_size=4))
entry = st.dictionaries(st.sampled_from(["low", "high", "log", "step", "choices", "x"]), values,
                        max_size=4)  # fmt: skip
keys = st.sampled_from(["lr", "batch_size", "optimizer", "epochs", "model_args.hidden", "nope",
                        "nesterov", "model_args.dropout"])  # fmt: skip


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(search=st.dictionaries(keys, st.one_of(entry, values), max_size=3))
def test_any_search_table_parses_or_is_one_clear_line(search):
    body = "\n".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in search.items())
    try:
        space = parse_space(f"[search]\n{body}\n", "p.toml")
        space.check("lab")
    except MnistlabError as e:
        assert str(e).startswith("p.toml") and "\n" not in str(e)
        return
    for p in space.search:  # what parsed is a usable range or list of choices
        assert p.kind in ("float", "int", "choice")
        assert p.choices or (p.low < p.high and math.isfinite(p.low) and math.isfinite(p.high))


def _toml(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, float):
        return repr(value)
    return json.dumps(value)


def test_the_readme_space_example_is_a_valid_space():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Sweeps", 1)[1]
    example = section.split("```toml", 1)[1].split("```", 1)[0]
    space = parse_space(example, "README.md")
    space.check(space.settings.recipe)
    assert {p.key for p in space.search} == {"lr", "batch_size", "model_args.hidden"}
