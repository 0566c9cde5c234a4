"""`mnistlab train`: flags map one to one onto TrainConfig fields."""

from __future__ import annotations

import dataclasses
import json
import sys
import time

import click

from .options import root_option

# Help for each TrainConfig field; the option is --field-name, default taken from the recipe.
FIELD_HELP = {
    "model": "Model name (see `mnistlab models`). Default: mlp.",
    "optimizer": "adam, adamw, sgd or rmsprop. Default: adam.",
    "lr": "Learning rate, or `auto`: the suggestion of `mnistlab lr-find` on this config. "
    "Default: 0.001.",
    "weight_decay": "Weight decay. Default: 0.",
    "momentum": "Momentum for sgd and rmsprop. Default: 0.",
    "nesterov": "Nesterov momentum for sgd.",
    "schedule": "Learning-rate schedule: none, step, cosine or onecycle. Default: none.",
    "step_size": "Epochs between decays for --schedule step. Default: 1.",
    "gamma": "Decay factor for --schedule step. Default: 0.7.",
    "label_smoothing": "Label smoothing of the training loss. Default: 0.",
    "grad_clip": "Clip the gradient norm to this value; 0 is off. Default: 0.",
    "batch_size": "Training batch size. Default: 64.",
    "eval_batch_size": "Evaluation batch size. Default: 1000.",
    "epochs": "Epochs. Default: 5.",
    "seed": "Random seed. Default: 0.",
    "device": "auto, cpu, cuda or mps. Default: auto (CUDA, then MPS, then CPU).",
    "threads": "Torch CPU threads, at most the usable cores; 0: one for small models, else one "
    "per idle core.",
    "train_limit": "Advanced: train on the first N training images only (for quick tests).",
    "val_split": "Hold out this fraction of the training set for validation. Default: off.",
    "early_stop": "Stop when validation loss has not improved for N epochs. Default: off.",
    "log_every": "Steps between progress lines. Default: 7 lines an epoch.",
    "augment": "Batched augmentation of training batches: none or affine. Default: none.",
    "aug_degrees": "affine: max rotation in degrees. Default: 10.",
    "aug_scale": "affine: max zoom in or out, as a fraction. Default: 0.1.",
    "aug_shear": "affine: max shear in degrees. Default: 0.",
    "aug_translate": "affine: max shift, as a fraction of the image. Default: 0.1.",
    "autocast": "Training precision: auto, none (float32), bf16 or fp16 (evaluation stays "
    "float32). Default: auto, bfloat16 only where it is native (`mnistlab doctor`).",
    "channels_last": "Channels-last (NHWC) memory layout. Default: auto, where it was measured "
    "to pay.",
    "ema": "Keep a moving average of the weights with this decay (e.g. 0.999); 0 is off.",
    "mlp_step": "mlp and logreg: gradients from a written-out backward pass instead of autograd "
    "(the same maths, faster). Default: on.",
    "eval_test": "Evaluate on the test set after every epoch and at the end. Default: on.",
}
SKIP = {"recipe", "model_args"}
FLAG_TYPES = {"channels_last": bool}  # None-by-default fields: None is auto


class LearningRate(click.ParamType):
    """A float, or `auto` (the learning-rate finder's suggestion)."""

    name = "float|auto"

    def convert(self, value, param, ctx):
        if isinstance(value, float) or value == "auto":
            return value
        try:
            return float(value)
        except ValueError:
            self.fail(f"{value!r} is not a number or 'auto'", param, ctx)


def _config_options(func):
    from ..config import TrainConfig

    for f in reversed([f for f in dataclasses.fields(TrainConfig) if f.name not in SKIP]):
        flag = "--" + f.name.replace("_", "-")
        kind = FLAG_TYPES.get(f.name, type(f.default))
        if kind is bool:
            func = click.option(
                f"{flag}/--no-{flag[2:]}", f.name, default=None, help=FIELD_HELP.get(f.name, "")
            )(func)
        else:
            help_text = FIELD_HELP.get(f.name, "")
            kind = LearningRate() if f.name == "lr" else kind
            func = click.option(flag, f.name, type=kind, default=None, help=help_text)(func)
    return func


@click.command()
@click.option(
    "--recipe", default=None, help="Named preset (`mnistlab models --recipes`). Default: lab."
)
@click.option(
    "--config", "config_file", default=None, metavar="FILE",
    help="TOML or JSON file of TrainConfig keys (e.g. from `mnistlab sweep best`); "
    "the recipe's values come first, flags override the file.",
)
@click.option(
    "--model-arg", "model_args", multiple=True, metavar="KEY=VALUE",
    help="Model constructor argument, e.g. --model-arg hidden=256 (repeatable).",
)
@click.option(
    "--nproc", type=int, default=None, metavar="N",
    help="Train with N processes (DistributedDataParallel, launched as torchrun would on this "
    "machine; gloo on CPU, NCCL on CUDA). Default: 1.",
)
@_config_options
@click.option("--name", default=None, help="Run folder name. Default: a timestamp.")
@click.option("--runs-dir", default="runs", show_default=True, help="Parent folder of runs.")
@click.option("--resume", default=None, metavar="RUN", help="Continue an interrupted run.")
@click.option("--json", "as_json", is_flag=True, help="Print the final summary as one JSON object.")
@click.option("--no-progress", is_flag=True, help="No progress bar, even on a terminal.")
@click.option("--no-report", is_flag=True, help="Do not write <run>/report.html at the end.")
@click.option(
    "--tensorboard",
    type=click.Path(file_okay=False),
    default=None,
    metavar="DIR",
    help="Also log to TensorBoard under DIR/<run name> (needs the extra `tensorboard`).",
)
@root_option
def train(recipe, config_file, model_args, nproc, name, runs_dir, resume, as_json, no_progress,
          no_report, tensorboard, root, **flags) -> None:
    """Train a model; every run leaves a self-describing folder under runs/.

    Under torchrun (`torchrun --nproc-per-node N -m mnistlab train ...`) or with --nproc N, each
    process trains on its share of every batch; rank 0 alone prints and writes the run folder.
    """
    from .. import distributed
    from ..config import parse_model_args
    from ..errors import MnistlabError
    from ..experiment import train_run

    started = time.perf_counter()  # `seconds` counts the work, not the imports (torch: ~1 s)
    if nproc is not None and nproc < 1:
        raise MnistlabError(f"--nproc must be at least 1, got {nproc}")
    launching = bool(nproc and nproc > 1) and distributed.world_size() == 1
    main_rank = distributed.rank() == 0

    def log(line: str) -> None:
        if main_rank:
            click.echo(line, err=as_json)

    if tensorboard is not None:
        from ..tblog import check_available

        check_available()
    auto_lr = flags.get("lr") == "auto"
    if auto_lr and resume is not None:
        raise MnistlabError("--lr auto chooses the rate of a new run; a resumed run keeps its own "
                            "(drop --lr)")
    if resume is not None:
        if config_file is not None:
            raise MnistlabError("--resume continues a run with its own config; drop --config")
        asked = {k: v for k, v in flags.items() if v is not None}
        if recipe is not None:
            asked["recipe"] = recipe
        extra_args = parse_model_args(model_args)
        if extra_args:
            asked["model_args"] = extra_args
        cfg = None
    else:
        cfg = resolve_flags({"recipe": recipe, "config_file": config_file,
                             "model_args": model_args, **flags})  # fmt: skip
        if auto_lr:
            cfg = _find_lr(cfg, root, log)
        asked = {}
    if launching:
        ctx = click.get_current_context()
        argv = distributed.without_option((ctx.find_root().obj or {}).get("argv")
                                          or sys.argv[1:], "--nproc")  # fmt: skip
        if auto_lr:  # every rank trains with the rate found once, here
            argv = [*distributed.without_option(argv, "--lr"), "--lr", repr(cfg.lr)]
        distributed.launch(nproc, argv, resume=resume)
        return
    # The report's figures are drawn by workers started now, on a core the training leaves
    # idle: their matplotlib import overlaps the training, and they draw in parallel after it.
    pool = None

    def on_plan(hw, execution) -> None:
        nonlocal pool
        from ..hardware import spare_cores

        if not no_report and main_rank and spare_cores(hw, execution) >= 1:
            from ..render import FigurePool

            pool = FigurePool(workers=2)

    try:
        summary = train_run(
            cfg,
            root=root,
            runs_dir=runs_dir,
            name=name,
            resume=resume,
            resume_check=asked,
            log=log,
            progress=sys.stderr.isatty() and not no_progress,
            started=started,
            tensorboard=tensorboard,
            on_plan=on_plan,
        )
        if not main_rank:
            return
        if not no_report:
            from ..errors import MnistlabError
            from ..report import build_report

            try:  # the run is saved whatever happens here; a failed report is only a warning
                done = build_report(summary["run_dir"], root=root, log=log, renderer=pool)
                log(f"Report: {done.path}")
            except MnistlabError as e:
                log(f"warning: no report ({e}); try `mnistlab report {summary['run_dir']}`")
    finally:
        if pool is not None:
            pool.close()
    if as_json:
        click.echo(json.dumps(summary))


def resolve_flags(params: dict):
    """The checked TrainConfig of a new run from parsed `train` parameters: the recipe, then
    `config_file` (--config), then the flags, with `model_args` (--model-arg KEY=VALUE) over
    the model arguments (`--lr auto` checked with the recipe's rate: the finder replaces it)."""
    from ..config import TrainConfig, parse_model_args, read_config_file, resolve_config

    fields = {f.name for f in dataclasses.fields(TrainConfig)} - SKIP
    flags = {k: v for k, v in params.items() if k in fields}
    if flags.get("lr") == "auto":
        flags["lr"] = None
    path = params.get("config_file")
    return resolve_config(params.get("recipe"), config=read_config_file(path) if path else None,
                          model_args=parse_model_args(params.get("model_args") or ()),
                          **flags)  # fmt: skip


def _find_lr(cfg, root, log):
    """`--lr auto`: the config with the learning-rate finder's suggestion as its rate."""
    import dataclasses

    import torch

    from ..hardware import decide, describe
    from ..lrfind import lr_find

    previous = torch.get_num_threads()
    torch.set_num_threads(decide(describe(), cfg).threads.value)  # --threads checked here too
    try:
        found = lr_find(cfg, root)
    finally:
        torch.set_num_threads(previous)
    log(f"lr-find: suggested lr {found.suggested_lr:.3g} after {len(found.lrs)} steps "
        f"({found.stopped}, {found.seconds:.1f}s); rule: {found.rule}")
    return dataclasses.replace(cfg, lr=found.suggested_lr).validate()
