"""Hyperparameter sweeps on Optuna: `mnistlab sweep NAME --space SPACE.toml`.

    space   the search space file → trial configs (TrainConfig), checked up front
    study   Optuna's storage (SQLite by default, or any database URL), heartbeats, samplers,
            pruners, the tally of trials
    worker  the objective (each trial a normal run under runs/<sweep>/trial-<n>/, chosen on
            validation), one worker's loop, K local worker processes
    report  `sweep status`, `sweep report` (HTML), `sweep best` (a config for `train --config`)
"""

from .space import Space, parse_space, read_space
from .study import Sweep, open_sweep, tally
from .worker import work

__all__ = ["Space", "Sweep", "open_sweep", "parse_space", "read_space", "tally", "work"]
