"""The ``cstar`` command line: ``train``, ``eval``, ``info`` and ``demo``.

Every option can also come from a YAML or JSON file given with ``--config``
(keys are the long option names with dashes or underscores; flags given on the
command line win). A run's resolved options are saved to ``config.yaml`` in its
output directory, beside ``env.json`` (versions, device, seed).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from fractions import Fraction
from pathlib import Path

import torch
import yaml

from . import __version__, data, distributed, models
from . import _presets as presets
from ._env import environment
from ._errors import CstarError
from ._io import atomic_write_text, load_checkpoint, prepare_run_dir, save_checkpoint, state_mismatch, write_json
from ._signals import Interrupted
from .counting import count_flops, count_params, format_table, layer_table
from .evaluate import evaluate, format_results
from .train import AMP_DTYPES, METHODS, OPTIMIZERS, SCHEDULES, TrainConfig, fit

# Options that control the command itself and are not saved to config.yaml.
_NOT_SAVED = {"command", "config", "force", "resume", "func", "defaults_preset"}


def parse_eps(text: str) -> float:
    """A radius given as a decimal (``0.3``) or a fraction (``8/255``)."""
    try:
        value = float(Fraction(text.strip()))
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"'{text}' is not a number: write e.g. 0.3 or 8/255") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is out of range: inputs are in [0, 1], so use 0 <= eps <= 1")
    return value


def _model_kwargs(pairs: list[str]) -> dict:
    """``["width=16", "dropout=0.1"]`` -> ``{"width": 16, "dropout": 0.1}`` (values parsed as YAML)."""
    out = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise CstarError(f"--model-arg '{pair}' is not KEY=VALUE: write e.g. --model-arg width=16")
        key, value = pair.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


def _device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CstarError(f"--device {name} but no CUDA GPU is visible: use --device cpu, or install a CUDA build of torch")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CstarError(f"unknown device '{name}': use auto, cpu, cuda or cuda:N") from None
    return distributed.local_device(device)  # under torchrun: this process's GPU, cuda:LOCAL_RANK


def _add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", help=f"dataset: {', '.join(sorted(data.DATASETS))}")
    g.add_argument("--root", default=None, help="dataset root folder (default: $CSTAR_DATA or ~/.cache/cstar/data)")
    g.add_argument("--download", action="store_true", help="download the official archive if it is missing")
    g.add_argument("--eps", type=parse_eps, default=None,
                   help="L-inf radius, e.g. 8/255 (default: the dataset's threat model: mnist 0.3, fashion_mnist 0.1, cifar 8/255)")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", help=f"architecture: {', '.join(models.list_models())}")
    g.add_argument("--width", type=int, default=None, help="base width of resnet18 / preact_resnet18 (64 in the paper)")
    g.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="extra keyword for the model builder, e.g. widen_factor=4 (repeatable)")


def _add_plan_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("rank plan")
    g.add_argument("--ratio", type=float, default=None, help="target compression ratio, e.g. 16")
    g.add_argument("--budget", choices=("params", "flops", "joint"), default="params",
                   help="what the ratio counts: parameters, MACs, or both (with --flops-ratio)")
    g.add_argument("--flops-ratio", type=float, default=None, help="MACs ratio of a joint budget")
    g.add_argument("--rank-method", choices=("global", "uniform"), default="global")
    g.add_argument("--exclude", default=None, help="comma-separated layers kept dense (default: first conv, classifier)")
    g.add_argument("--multiple-of", type=int, default=1, help="round ranks to multiples of this (default: 1)")


def _plan_kwargs(args: argparse.Namespace) -> dict:
    _require(args, "ratio")
    return {"ratio": args.ratio, "budget": args.budget, "flops_ratio": args.flops_ratio, "method": args.rank_method,
            "exclude": _names(args.exclude) or None,
            "multiple_of": args.multiple_of}


def _add_pipeline_args(p: argparse.ArgumentParser, title: str):
    """The options compress and compare share (starting model, data, training attack, held-out and
    evaluation settings); returns the argument group ``title`` for the command's own options."""
    p.add_argument("--checkpoint", default=None,
                   help="dense robust model to start from (model.pt of 'cstar train', or a cstar.save directory); "
                        "without it, one is trained")
    _add_model_args(p)
    _add_data_args(p)
    g = p.add_argument_group(title)
    g.add_argument("--method", choices=METHODS, default=None, help="training attack of every phase (default: pgd)")
    g.add_argument("--train-n", type=int, default=None, help="train on the first N training images only")
    g.add_argument("--val-size", type=int, default=1000, help="training images held out for per-epoch checks")
    g.add_argument("--eval-attacks", default="clean,pgd20")
    g.add_argument("--eval-step", type=parse_eps, default=None, help="PGD step size for evaluation (default: eps/4)")
    g.add_argument("--eval-n", type=int, default=None, help="evaluate on the first N test images (default: all)")
    return g


def _add_run_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("run")
    g.add_argument("--out", default=None, help="output directory (default: runs/<command>-<model>-<data>-<time>)")
    g.add_argument("--force", action="store_true", help="overwrite an existing output directory")
    g.add_argument("--config", default=None, help="YAML/JSON file of option values (command-line flags win)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    g.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars or per-epoch lines")


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (a CstarError), not a usage dump."""

    def error(self, message: str):
        raise CstarError(f"{self.prog}: {message} (see '{self.prog} --help')")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cstar", description="Compact, structured and adversarially robust CNNs.")
    parser.add_argument("--version", action="version", version=f"cstar {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    parser.subcommands = sub.choices  # name -> parser, for --config defaults

    t = sub.add_parser("train", help="adversarially train a dense model",
                       description="Adversarially train a model (PGD-AT, FGSM-RS, N-FGSM or TRADES) and evaluate it.")
    _add_model_args(t)
    _add_data_args(t)
    d = TrainConfig.__dataclass_fields__
    g = t.add_argument_group("training")
    g.add_argument("--method", choices=METHODS, default="pgd", help="training attack/objective (default: pgd)")
    g.add_argument("--epochs", type=int, default=d["epochs"].default)
    g.add_argument("--batch-size", type=int, default=d["batch_size"].default)
    g.add_argument("--attack-steps", type=int, default=d["attack_steps"].default, help="PGD/TRADES steps (default: 10)")
    g.add_argument("--attack-step", type=parse_eps, default=None,
                   help="attack step size (default: 2.5*eps/steps for PGD, 1.25*eps for FGSM-RS, eps for N-FGSM)")
    g.add_argument("--eps-warmup", type=float, default=0.0, help="epochs over which eps ramps up from 0 (default: 0)")
    g.add_argument("--trades-beta", type=float, default=d["trades_beta"].default)
    g.add_argument("--optimizer", choices=OPTIMIZERS, default="sgd")
    g.add_argument("--lr", type=float, default=d["lr"].default, help="peak learning rate (default: 0.1)")
    g.add_argument("--momentum", type=float, default=d["momentum"].default)
    g.add_argument("--weight-decay", type=float, default=d["weight_decay"].default)
    g.add_argument("--schedule", choices=SCHEDULES, default="cosine")
    g.add_argument("--warmup-epochs", type=float, default=0.0)
    g.add_argument("--grad-clip", type=float, default=None, help="clip the gradient norm to this value")
    g.add_argument("--amp", action="store_true",
                   help="mixed precision on CUDA: bfloat16 autocast where the GPU supports it, else float16 with "
                   "loss scaling (see --amp-dtype)")
    g.add_argument("--amp-dtype", choices=AMP_DTYPES, default="auto",
                   help="the autocast type of --amp: auto (default: by the GPU; nothing on the CPU), or bfloat16 "
                   "or float16 on any device")
    g.add_argument("--channels-last", action="store_true",
                   help="train in channels-last memory format (faster convs; on the CPU it stays off, with a "
                   "warning, for a model with a strided 1x1 conv of < 16 input channels, which oneDNN mis-trains "
                   "in that format)")
    g.add_argument("--sync-bn", action="store_true", help="under torchrun on GPUs: BatchNorm statistics over all ranks")
    g.add_argument("--train-n", type=int, default=None, help="train on the first N training images only")
    g.add_argument("--val-size", type=int, default=1000,
                   help="training images held out (from the end) for the per-epoch PGD check (default: 1000)")
    g.add_argument("--check-size", type=int, default=d["check_size"].default)
    g.add_argument("--select", choices=("last", "best"), default="last",
                   help="keep the last epoch or the one with the best PGD check (default: last)")
    g.add_argument("--no-overfit-guard", action="store_true",
                   help="do not stop when the PGD check collapses (catastrophic overfitting)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    e = t.add_argument_group("final evaluation")
    e.add_argument("--eval-attacks", default="clean,pgd20", help="comma-separated (default: clean,pgd20)")
    e.add_argument("--eval-step", type=parse_eps, default=None, help="PGD step size for evaluation (default: eps/4)")
    e.add_argument("--eval-n", type=int, default=None, help="evaluate the first N test images (default: all)")
    _add_run_args(t)
    t.set_defaults(func=cmd_train)

    ev = sub.add_parser("eval", help="evaluate a checkpoint under attack",
                        description="Clean, FGSM, PGD-k and AutoAttack accuracy of a saved model.")
    ev.add_argument("checkpoint", help="model.pt / checkpoint.pt of 'cstar train', or a cstar.save directory")
    _add_data_args(ev)
    ev.add_argument("--attacks", default="clean,pgd20", help="comma-separated: clean, fgsm, pgdK, aa (default: clean,pgd20)")
    ev.add_argument("--step", type=parse_eps, default=None, help="PGD step size (default: eps/4)")
    ev.add_argument("--n", type=int, default=None, help="evaluate the first N test images (default: all)")
    ev.add_argument("--batch-size", type=int, default=256)
    ev.add_argument("--json", default=None, help="write a RobustBench-style JSON here (progress kept in JSON.partial)")
    ev.add_argument("--resume", action="store_true",
                    help="continue a killed evaluation with the same --json after its last finished batch")
    ev.add_argument("--per-example", action="store_true",
                    help="also keep in the --json which test images each attack left correct, for paired "
                         "comparisons of two models (cstar.paired_difference)")
    ev.add_argument("--device", default="auto")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--config", default=None, help="YAML/JSON file of option values")
    ev.set_defaults(func=cmd_eval)

    i = sub.add_parser("info", help="parameters and MACs per layer of a model",
                       description="Print a model's layers with parameters, MACs (multiply-accumulates) and output shapes.")
    i.add_argument("checkpoint", nargs="?", default=None, help="a checkpoint (or give --model)")
    _add_model_args(i)
    i.add_argument("--data", default=None, help="dataset whose input shape and classes to use (default: cifar10)")
    i.add_argument("--num-classes", type=int, default=None)
    i.add_argument("--config", default=None)
    i.set_defaults(func=cmd_info)

    c = sub.add_parser("compress", help="CSTAR: robust low-rank compression to a target ratio",
                       description="Dense robust model -> global ranks -> ADMM adversarial training -> decomposition "
                                   "-> adversarial fine-tuning -> evaluation. Training sections (dense, admm_train, "
                                   "finetune) and admm take YAML mappings, e.g. --finetune '{epochs: 3, lr: 0.01}', "
                                   "or nested keys in --config (see configs/).")
    g = _add_pipeline_args(c, "compression")
    g.add_argument("--ratio", type=float, default=8.0, help="target compression ratio (default: 8)")
    g.add_argument("--budget", choices=("params", "flops", "joint"), default="params",
                   help="what the ratio counts: parameters, MACs, or both (with --flops-ratio)")
    g.add_argument("--flops-ratio", type=float, default=None, help="MACs ratio of a joint budget")
    g.add_argument("--rank-method", choices=("global", "uniform"), default="global")
    g.add_argument("--exclude", default=None, help="comma-separated layers kept dense (default: first conv, classifier)")
    g.add_argument("--dense", type=_yaml_mapping, default=None, help="dense training settings (YAML mapping)")
    g.add_argument("--admm-train", type=_yaml_mapping, default=None, help="ADMM-phase training settings")
    g.add_argument("--admm", type=_yaml_mapping, default=None, help="ADMM settings: rho, rho_growth, interval...")
    g.add_argument("--finetune", type=_yaml_mapping, default=None, help="fine-tuning settings")
    g.add_argument("--eval-phases", default="dense,admm_projected,final",
                   help="models to evaluate: dense, admm_projected (ADMM model after the final projection), final")
    g.add_argument("--autoattack-n", type=int, default=0, help="AutoAttack the final model on the first N test images")
    g.add_argument("--resume", action="store_true", help="continue the run in --out where it stopped")
    _add_run_args(c)
    c.set_defaults(func=cmd_compress)

    m = sub.add_parser("compare", help="CSTAR beside robust channel pruning and post-hoc low rank, same budget",
                       description="From one dense robust model, run each method at each ratio with the same training "
                                   "budget (a first phase of --search epochs: ADMM for cstar, channel scores for hydra, "
                                   "fine-tuning for the others; then --finetune epochs), evaluate all with the same "
                                   "attacks, and write results.json, comparison.md and accuracy_vs_ratio.png. "
                                   "--resume reruns no finished (method, ratio) cell.")
    g = _add_pipeline_args(m, "comparison")
    g.add_argument("--ratios", default="4,16", help="comma-separated parameter ratios (default: 4,16)")
    g.add_argument("--methods", default="dense,cstar,hydra,magnitude,lowrank_global,lowrank_uniform",
                   help="comma-separated: dense, cstar, hydra, magnitude, lowrank_global, lowrank_uniform")
    g.add_argument("--dense", type=_yaml_mapping, default=None, help="dense training settings (without --checkpoint)")
    g.add_argument("--search", type=_yaml_mapping, default=None,
                   help="first-phase settings of every method (default epochs 5, lr 0.01)")
    g.add_argument("--finetune", type=_yaml_mapping, default=None,
                   help="fine-tuning settings of every method (default epochs 5, lr 0.01)")
    g.add_argument("--admm", type=_yaml_mapping, default=None, help="CSTAR's ADMM settings: rho, rho_growth, interval...")
    g.add_argument("--autoattack-n", type=int, default=0, help="AutoAttack every model on the first N test images")
    g.add_argument("--latency-runs", type=int, default=50, help="batch-1 CPU latency: median of N runs (0: off)")
    g.add_argument("--resume", action="store_true", help="continue the comparison in --out; finished cells are kept")
    _add_run_args(m)
    m.set_defaults(func=cmd_compare)

    r = sub.add_parser("ranks", help="print the global rank plan for a target ratio",
                       description="Select Tucker-2/SVD ranks of every compressible layer for a target ratio and "
                                   "print the plan (ranks, parameters, MACs, retained energy).")
    r.add_argument("checkpoint", nargs="?", default=None, help="a trained model (else --model, randomly initialised)")
    _add_model_args(r)
    r.add_argument("--data", default=None, help="dataset whose input shape and classes to use (default: cifar10)")
    _add_plan_args(r)
    r.add_argument("--json", default=None, help="also write the plan as JSON here")
    r.add_argument("--config", default=None)
    r.set_defaults(func=cmd_ranks)

    dc = sub.add_parser("decompose", help="factorise a dense model by a rank plan (no training)",
                        description="Select ranks for a ratio (or read a plan) and write the factorised model "
                                    "(cstar.save format). This is post-hoc low-rank compression, without ADMM.")
    dc.add_argument("checkpoint", help="the dense model: model.pt of 'cstar train' or a cstar.save directory")
    _add_plan_args(dc)
    dc.add_argument("--plan", default=None, help="a plan JSON from 'cstar ranks --json' (instead of --ratio)")
    dc.add_argument("--n-iter", type=int, default=0, help="HOOI sweeps refining each Tucker-2 factorisation")
    dc.add_argument("--out", required=True, help="output directory of the factorised model")
    dc.add_argument("--config", default=None)
    dc.set_defaults(func=cmd_decompose)

    x = sub.add_parser("export", help="export a model to ONNX or TorchScript",
                       description="Export a saved model (cstar.save directory or checkpoint) for deployment.")
    x.add_argument("model", help="a cstar.save directory or a checkpoint.pt")
    x.add_argument("--format", choices=("onnx", "torchscript"), default="onnx")
    x.add_argument("--out", required=True, help="output file (.onnx or .pt)")
    x.add_argument("--force", action="store_true", help="overwrite an existing --out file")
    x.add_argument("--config", default=None)
    x.set_defaults(func=cmd_export)

    m = sub.add_parser("demo", help="the whole job on scikit-learn's digits in about 2 minutes (no download)",
                       description="Adversarially train a small CNN on scikit-learn's 8x8 digits, compress it with "
                                   "CSTAR beside magnitude channel pruning and post-hoc low rank at the same ratios "
                                   "and training budget, and print one table (params, MACs, clean and PGD-20 "
                                   "accuracy, batch-1 latency).")
    m.add_argument("--out", default=None, help="output directory (default: runs/demo-<time>)")
    m.add_argument("--epochs", type=int, default=20, help="dense PGD training epochs (default: 20)")
    m.add_argument("--phase-epochs", type=int, default=4,
                   help="epochs of each method's first phase and of its fine-tuning (default: 4)")
    m.add_argument("--ratios", default="4,8", help="comma-separated parameter ratios (default: 4,8)")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--force", action="store_true")
    m.add_argument("--config", default=None)
    m.set_defaults(func=cmd_demo)
    return parser


def _yaml_mapping(text: str) -> dict:
    """A YAML mapping given on the command line, e.g. ``'{epochs: 3, lr: 0.01}'``."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"'{text}' is not a YAML mapping: write e.g. '{{epochs: 3, lr: 0.01}}'")
    return value


def _load_config_file(path: str) -> dict:
    p = presets.resolve(path)  # a file, or the name of a shipped preset
    try:
        values = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise CstarError(f"config file {p} is not valid YAML/JSON ({str(exc).splitlines()[0]}): fix its syntax") from None
    if not isinstance(values, dict):
        raise CstarError(f"config file {p} must hold a mapping of option: value, not a {type(values).__name__}")
    return {str(k).replace("-", "_"): v for k, v in values.items()}


# Options that hold a YAML mapping (a training, ADMM... section): a value given on the command line
# changes the keys it names in the same section of --config (or of a resumed run), not the whole section.
_SECTIONS = presets.SECTIONS
# Options a resumed run may change; any other option given with --resume must equal the run's record.
_MAY_CHANGE_ON_RESUME = {"device", "no_progress", "out"}
_EVALUATION_OPTIONS = {"eval_attacks", "eval_step", "eval_n", "autoattack_n", "latency_runs"}


class _Unset:
    """The default of every option while finding which options the command line gives."""

    def __repr__(self) -> str:
        return "<unset>"


def _given_options(argv: list[str] | None, command: str) -> dict:
    """The options given on the command line itself (dest -> parsed value), without defaults."""
    parser = build_parser()
    sub = parser.subcommands[command]
    unset = _Unset()
    plain = [a.dest for a in sub._actions if a.dest != "help" and not isinstance(a, argparse._AppendAction)]
    sub.set_defaults(**{dest: unset for dest in plain})
    args = parser.parse_args(argv)
    given = {k: v for k, v in vars(args).items() if k in plain and not isinstance(v, _Unset)}
    for action in sub._actions:
        if isinstance(action, argparse._AppendAction) and getattr(args, action.dest):
            given[action.dest] = getattr(args, action.dest)
    return given


def _config_values(args: argparse.Namespace, sub: argparse.ArgumentParser) -> dict:
    """The option values of ``--config``, checked against the command's options and typed as its flags."""
    values = _load_config_file(args.config)
    known = {a.dest for a in sub._actions} - {"help"} - _NOT_SAVED
    unknown = sorted(set(values) - known)
    if unknown:
        raise CstarError(f"unknown option(s) {', '.join(unknown)} in {args.config}: valid options for "
                         f"'cstar {args.command}' are {', '.join(sorted(known))}")
    actions = {a.dest: a for a in sub._actions}
    for key, value in values.items():  # a YAML list or number for a text option: what its flag would give
        action = actions[key]
        if type(action) is argparse._StoreAction and action.type is None and action.nargs is None:
            if isinstance(value, (list, tuple)):
                values[key] = ",".join(str(v) for v in value)
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                values[key] = str(value)
    for key in ("eps", "attack_step", "step", "eval_step"):
        if isinstance(values.get(key), str):
            try:
                values[key] = parse_eps(values[key])
            except argparse.ArgumentTypeError as exc:
                raise CstarError(f"{key} in {args.config}: {exc}") from None
    return values


def _recorded_options(args: argparse.Namespace, given: dict) -> dict:
    """The options recorded in the ``config.yaml`` of the run that ``--resume --out DIR`` continues.

    Every option given now (on the command line or in ``--config``) must equal
    the recorded one, except those a resume may change; otherwise the resume is
    refused, naming each difference, before anything in DIR is touched.
    """
    record_path = Path(args.out) / "config.yaml"
    if not record_path.is_file():
        return {}
    try:
        recorded = yaml.safe_load(record_path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError:
        raise CstarError(f"{record_path} is not valid YAML: restore it, or start a new run without --resume") from None
    may_change = _MAY_CHANGE_ON_RESUME | (_EVALUATION_OPTIONS if args.command in ("train", "compare") else set())
    differences = [f"--{key.replace('_', '-')} {_shown(value)} (the run has {_shown(recorded[key])})"
                   for key, value in sorted(given.items())
                   if key in recorded and key not in may_change and not _same_option(value, recorded[key])]
    if differences:
        raise CstarError(f"cannot resume {args.out} with other settings: {'; '.join(differences)}; resume with "
                         f"just --resume --out {args.out} (it reads the rest from {record_path}), or start a new "
                         "run in another --out")
    return {key: value for key, value in recorded.items() if key not in _NOT_SAVED}


def _same_option(a, b) -> bool:
    """``a`` (given now) equals ``b`` (recorded); a section agrees when every key it names does."""
    if isinstance(a, dict) and isinstance(b, dict):
        return all(key in b and _same_option(value, b[key]) for key, value in a.items())
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return abs(a - b) <= 1e-12 * max(1.0, abs(a), abs(b))
    return a == b


def _shown(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line; options resolve as built-in default < the dataset's preset for the device
    (``compress`` and ``compare``, :func:`cstar._presets.dataset_defaults`) < ``--config`` < flags.

    A section option (``--dense``, ``--admm-train``, ``--admm``, ``--finetune``,
    ``--search``) changes only the keys it names of the section below it.
    With ``--resume --out DIR``, DIR's recorded ``config.yaml`` supplies every
    option not given (see :func:`_recorded_options`). ``args.defaults_preset``
    names the dataset preset used (None: none applied).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    sub = parser.subcommands[args.command]
    given = _given_options(argv, args.command)
    values = _config_values(args, sub) if args.config else {}
    recorded = {}
    if getattr(args, "resume", False) and getattr(args, "out", None) and "out" in {a.dest for a in sub._actions}:
        recorded = _recorded_options(args, {**values, **given})
        values = {**recorded, **values}
    defaults_preset = None
    if args.command in ("compress", "compare") and not recorded:  # a resumed run's record is complete
        device = given.get("device", values.get("device", "auto"))
        defaults_preset, base = presets.dataset_defaults(args.command, given.get("data", values.get("data")),
                                                         _device_type(device))
        values = _layered(base, values)
    merged = _layered(values, given)  # a section flag changes the keys it names, not the whole section
    if values:
        sub.set_defaults(**values)
        args = parser.parse_args(argv)
    for key in _SECTIONS:
        if key in merged:
            setattr(args, key, merged[key])
    args.defaults_preset = defaults_preset
    return args


def _layered(below: dict, above: dict) -> dict:
    """``above`` over ``below``: sections (YAML mappings) merge key by key, other options replace."""
    out = {**below, **above}
    for key in _SECTIONS:
        if isinstance(below.get(key), dict) and isinstance(above.get(key), dict):
            out[key] = {**below[key], **above[key]}
    return out


def _device_type(name: str) -> str:
    """"cuda" or "cpu": the kind of device ``--device name`` will be (auto: cuda when one is visible)."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cuda" if str(name).startswith("cuda") else "cpu"


def _require(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        if getattr(args, name, None) is None:
            raise CstarError(f"--{name} is required: give it on the command line or as '{name}:' in --config")


def _build_model(args: argparse.Namespace, spec: data.DatasetSpec, num_classes: int) -> torch.nn.Module:
    kwargs = _model_kwargs(args.model_arg)
    if args.width is not None:
        kwargs["width"] = args.width
    c, h, _ = spec.image_shape
    return models.create(args.model, num_classes, in_channels=c, input_size=h, mean=spec.mean, std=spec.std, **kwargs)


def _default_out(kind: str, *parts: str) -> Path:
    return Path("runs") / "-".join([kind, *[p for p in parts if p], time.strftime("%Y%m%d-%H%M%S")])


def _validation(train_set, test_set, val_size: int, check_size: int, device: torch.device):
    """Split the training set into (training part, validation tensors) for the per-epoch check.

    In-memory datasets hold out their last ``val_size`` training images. A folder
    dataset cannot be split cheaply, so its check uses the first ``check_size``
    images of its validation folder (said in the log).
    """
    if val_size <= 0 or check_size <= 0:
        return train_set, None
    if isinstance(train_set, data.FolderData):
        print(f"per-epoch check on the first {check_size} images of the validation folder")
        xs, ys, seen = [], [], 0
        for x, y in data.make_loader(test_set, min(256, check_size), train=False, device=device):
            xs.append(x)
            ys.append(y)
            seen += len(y)
            if seen >= check_size:
                break
        return train_set, (torch.cat(xs)[:check_size], torch.cat(ys)[:check_size])
    if val_size >= len(train_set):
        raise CstarError(f"--val-size {val_size} leaves no training data ({len(train_set)} images): use a smaller value")
    return train_set.split_off(val_size, device)


def _run_dir(path: str | Path, *, force: bool, resume: bool) -> Path:
    """:func:`prepare_run_dir` on rank 0 (under torchrun); every rank gets rank 0's path."""
    out = prepare_run_dir(path, force=force, resume=resume) if distributed.is_main() else None
    return Path(distributed.broadcast_object(str(out) if out is not None else None))


def _write_run_files(out: Path, args: argparse.Namespace, eps: float, device: torch.device) -> None:
    """``config.yaml`` (the resolved options) and ``env.json``, from rank 0 only."""
    if distributed.is_main():
        saved = {k: v for k, v in vars(args).items() if k not in _NOT_SAVED}
        atomic_write_text(out / "config.yaml", yaml.safe_dump({**saved, "eps": eps}, sort_keys=False))
        write_json(out / "env.json", {**environment(device, args.seed), "world_size": distributed.world_size(),
                                      "defaults_preset": getattr(args, "defaults_preset", None)})


def cmd_train(args: argparse.Namespace) -> int:
    _require(args, "model", "data")
    device = _device(args.device)
    train_set = _first_n(data.load(args.data, args.root, split="train", download=args.download), args.train_n)
    test_set = data.load(args.data, args.root, split="test", download=args.download)
    eps = train_set.spec.eps if args.eps is None else args.eps
    config = TrainConfig(
        method=args.method, epochs=args.epochs, batch_size=args.batch_size, eps=eps,
        attack_steps=args.attack_steps, attack_step=args.attack_step, eps_warmup_epochs=args.eps_warmup,
        trades_beta=args.trades_beta, optimizer=args.optimizer, lr=args.lr, momentum=args.momentum,
        weight_decay=args.weight_decay, schedule=args.schedule, warmup_epochs=args.warmup_epochs,
        grad_clip=args.grad_clip, amp=args.amp, amp_dtype=args.amp_dtype, channels_last=args.channels_last, check_size=args.check_size, overfit_guard=not args.no_overfit_guard,
        select=args.select, seed=args.seed, progress=not args.no_progress, sync_bn=args.sync_bn)
    eval_attacks = _names(args.eval_attacks)
    torch.manual_seed(args.seed)  # the initial weights
    model = _build_model(args, train_set.spec, train_set.num_classes).to(device)
    train_part, val = _validation(train_set, test_set, args.val_size, config.check_size, device)
    out = _run_dir(args.out or _default_out("train", args.model, args.data), force=args.force, resume=args.resume)
    _write_run_files(out, args, eps, device)
    print(f"cstar train: {args.model} on {args.data} ({len(train_part)} train / {len(test_set)} test images), "
          f"{args.method} eps={eps:.4g}, {count_params(model):,} parameters, device {device}; output in {out}")
    loader = data.make_loader(train_part, config.batch_size, train=True, device=device, seed=args.seed,
                              rank=distributed.rank(), world_size=distributed.world_size())
    t0 = time.perf_counter()
    history = fit(model, loader, config, val=val, out_dir=out, resume=args.resume)
    train_seconds = time.perf_counter() - t0
    if distributed.is_main():
        save_checkpoint(out / "model.pt", {"model": model.state_dict(), "model_config": model.cstar_config,
                                           "dataset": args.data, "eps": eps})
    result = evaluate(model, test_set, eval_attacks, eps=eps, step=args.eval_step, n=args.eval_n, seed=args.seed,
                      out_path=out / "results.json",
                      meta={"model": args.model, "dataset": args.data, "method": args.method,
                            "epochs_run": len(history), "train_seconds": round(train_seconds, 1)})
    print(format_results({f"{args.model} ({args.method})": result}))
    print(f"trained in {train_seconds / 60:.1f} min; results in {out / 'results.json'}, model in {out / 'model.pt'}")
    return 0


def _model_from_checkpoint(path: str, device: torch.device) -> tuple[torch.nn.Module, dict]:
    state = load_checkpoint(path, map_location=device)
    config = state.get("model_config")
    if not config:
        raise CstarError(f"{path} has no model description (model_config): it was not written by 'cstar train'")
    model = models.create(**config)
    weights = state["model"]
    problem = state_mismatch(model, {k: v.shape for k, v in weights.items()}) if isinstance(weights, dict) else "no tensors"
    if problem:  # checked before any weight is copied
        raise CstarError(f"{path} does not match its architecture '{config['name']}' ({problem}): "
                         "the file is corrupt or edited; pass the checkpoint that 'cstar train' wrote")
    model.load_state_dict(weights)
    return model.to(device), state


def _run_config_beside(path: str) -> dict:
    """The config.yaml of the run a checkpoint belongs to, if there is one."""
    cfg = Path(path).parent / "config.yaml"
    return yaml.safe_load(cfg.read_text(encoding="utf-8")) if cfg.is_file() else {}


def cmd_eval(args: argparse.Namespace) -> int:
    device = _device(args.device)
    if Path(args.checkpoint).is_dir():  # a cstar.save directory
        model, state = _load_model(args.checkpoint, device), {}
    else:
        model, state = _model_from_checkpoint(args.checkpoint, device)
    run = _run_config_beside(args.checkpoint)
    name = args.data or state.get("dataset") or run.get("data")
    if name is None:
        raise CstarError(f"which dataset? {args.checkpoint} does not say: pass --data")
    root = args.root if args.root is not None else run.get("root")
    test_set = data.load(name, root, split="test", download=args.download)
    _check_fits_data(model, args.checkpoint, name, test_set.spec, test_set.num_classes)
    trained_on = state.get("dataset") or run.get("data")
    if args.eps is not None:
        eps = args.eps
    elif trained_on in (None, name):
        eps = state.get("eps", test_set.spec.eps)
    else:  # another dataset of the same shape: its own threat model
        eps = test_set.spec.eps
        print(f"note: {args.checkpoint} was trained on {trained_on}; evaluating on {name} at its eps {eps:g} "
              "(pass --eps to choose)", flush=True)
    attacks_to_run = _names(args.attacks)
    if args.resume and not args.json:
        raise CstarError("--resume continues the evaluation whose progress sits beside its --json: pass --json")
    if args.per_example and not args.json:
        raise CstarError("--per-example keeps its results in the --json card: pass --json")
    result = evaluate(model, test_set, attacks_to_run, eps=eps, step=args.step, n=args.n, batch_size=args.batch_size,
                      seed=args.seed, out_path=args.json, progress=True, resume=args.resume,
                      per_example=args.per_example,
                      meta={"model": model.cstar_config["name"], "dataset": name, "checkpoint": str(args.checkpoint)})
    path = Path(args.checkpoint)
    print(format_results({(path.name if path.is_dir() else path.parent.name) or "model": result}))
    print(f"{result['subset']} of the {name} test set, eps={eps:.4g}; seconds per attack: {result['seconds']}")
    return 0


def _load_model(path: str, device: torch.device = torch.device("cpu")) -> torch.nn.Module:
    """A cstar.save directory or a checkpoint written by 'cstar train'."""
    if Path(path).is_dir():
        from .serialize import load

        return load(path, map_location=device)
    return _model_from_checkpoint(path, device)[0]


def _input_shape(model: torch.nn.Module) -> tuple[int, int, int]:
    cfg = getattr(model, "cstar_config", None)
    if not cfg:
        raise CstarError("the model has no cstar_config, so its input shape is unknown: use a built-in model")
    return (cfg["in_channels"], cfg["input_size"], cfg["input_size"])


def _model_for_planning(args: argparse.Namespace) -> torch.nn.Module:
    if args.checkpoint:
        return _load_model(args.checkpoint)
    if not args.model:
        raise CstarError("give a checkpoint or --model NAME")
    key = (args.data or "cifar10").lower().replace("-", "_")
    if key not in data.DATASETS:
        raise CstarError(f"unknown dataset '{args.data}': choose one of {', '.join(sorted(data.DATASETS))}")
    spec = data.DATASETS[key]
    return _build_model(args, spec, getattr(args, "num_classes", None) or spec.num_classes)


def cmd_ranks(args: argparse.Namespace) -> int:
    from .lowrank import select_ranks

    torch.manual_seed(0)
    model = _model_for_planning(args)
    plan = select_ranks(model, **_plan_kwargs(args))
    print(plan.table())
    if args.json:
        plan.save(args.json)
        print(f"plan written to {args.json}")
    return 0


def cmd_decompose(args: argparse.Namespace) -> int:
    from .lowrank import RankPlan, decompose, select_ranks
    from .serialize import save

    model = _load_model(args.checkpoint)
    plan = RankPlan.load(args.plan) if args.plan else select_ranks(model, **_plan_kwargs(args))
    factorised = decompose(model, plan, n_iter=args.n_iter)
    out = save(factorised, args.out)
    print(plan.table())
    print(f"factorised model written to {out} ({count_params(model):,} -> {count_params(factorised):,} parameters)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .serialize import export

    if Path(args.out).exists() and not args.force:
        raise CstarError(f"{args.out} already exists: pass --force to overwrite it, or choose another --out")
    model = _load_model(args.model)
    path = export(model, args.out, format=args.format, input_shape=_input_shape(model))
    print(f"{args.format} model written to {path}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    model = _model_for_planning(args)
    shape = _input_shape(model)
    rows = layer_table(model, shape)
    print(format_table(rows))
    factorised = getattr(model, "cstar_lowrank", None)
    if factorised:
        print("\nfactorised layers (Tucker-2 ranks are r_out, r_in):")
        for name, layer in factorised.items():
            print(f"  {name:<28} {layer['kind']:<8} ranks {', '.join(map(str, layer['ranks']))}")
    print(f"parameters: {count_params(model):,}   MACs per image: {count_flops(model, shape):,}   input: {tuple(shape)}")
    return 0


def _phase_config(section: dict | None, common: dict) -> TrainConfig:
    values = {**common, **(section or {})}
    for key in ("eps", "attack_step"):
        if isinstance(values.get(key), str):
            values[key] = parse_eps(values[key])
    return TrainConfig.from_dict(values)


def _first_n(train_set, n: int | None):
    """The first ``n`` training images (--train-n), or all of them."""
    if n is None:
        return train_set
    if not hasattr(train_set, "take"):
        raise CstarError("--train-n needs an in-memory dataset (not an image folder): drop it")
    if not 0 < n <= len(train_set):
        raise CstarError(f"--train-n {n} must be between 1 and {len(train_set)}")
    return train_set.take(n)


def _pipeline_data(args: argparse.Namespace):
    """(train set, test set, eps, training settings common to every phase) of compress and compare."""
    _require(args, "data")
    train_set = _first_n(data.load(args.data, args.root, split="train", download=args.download), args.train_n)
    test_set = data.load(args.data, args.root, split="test", download=args.download)
    eps = train_set.spec.eps if args.eps is None else args.eps
    common = {"eps": eps, "seed": args.seed, "progress": not args.no_progress}
    if args.method:
        common["method"] = args.method
    return train_set, test_set, eps, common


def _check_fits_data(model: torch.nn.Module, source: str, name: str, spec: data.DatasetSpec,
                     num_classes: int) -> None:
    """One line when ``model`` (from ``source``) cannot take ``name``'s images or predict its classes."""
    cfg = getattr(model, "cstar_config", None) or {}
    if cfg.get("num_classes") not in (None, num_classes):
        raise CstarError(f"{source} predicts {cfg['num_classes']} classes but {name} has {num_classes}: "
                         "pass the dataset it was trained on")
    c, h, w = spec.image_shape
    wants = (cfg.get("in_channels"), cfg.get("input_size"))
    if None not in wants and (wants[0] != c or (wants[1] != h and name != "imagefolder")):
        raise CstarError(f"{source} takes {wants[0]}x{wants[1]}x{wants[1]} images but {name} has {c}x{h}x{w}: "
                         f"pass the dataset it was trained on, or a model built for {name}")


def _check_model_options(args: argparse.Namespace, model: torch.nn.Module) -> None:
    """--model / --width given beside --checkpoint must describe the checkpoint's architecture."""
    cfg = getattr(model, "cstar_config", None) or {}
    if args.model and cfg.get("name") and args.model != cfg["name"]:
        raise CstarError(f"--model {args.model} contradicts {args.checkpoint}, a {cfg['name']}: drop --model "
                         "(the checkpoint says its architecture)")
    if args.width is not None and cfg.get("width") not in (None, args.width):
        raise CstarError(f"--width {args.width} contradicts {args.checkpoint}, of width {cfg['width']}: drop --width")


def _starting_model(args: argparse.Namespace, train_set, device: torch.device) -> torch.nn.Module:
    """The dense model of --checkpoint, or a fresh --model (seeded with --seed) to be trained first."""
    if args.checkpoint:
        model = _load_model(args.checkpoint, device)  # model.pt of 'cstar train', or a cstar.save directory
        _check_model_options(args, model)
        _check_fits_data(model, args.checkpoint, args.data, train_set.spec, train_set.num_classes)
        return model
    _require(args, "model")
    torch.manual_seed(args.seed)  # the initial weights
    return _build_model(args, train_set.spec, train_set.num_classes).to(device)


def cmd_compress(args: argparse.Namespace) -> int:
    from .compress import CompressConfig, check_plan, compress

    device = _device(args.device)
    train_set, test_set, eps, common = _pipeline_data(args)
    config = CompressConfig(
        ratio=args.ratio, budget=args.budget, flops_ratio=args.flops_ratio, rank_method=args.rank_method,
        exclude=_names(args.exclude) or None,
        dense=_phase_config(args.dense, common), admm_train=_phase_config(args.admm_train, common),
        finetune=_phase_config({"epochs": 5, "lr": 0.01, **(args.finetune or {})}, common),
        eval_attacks=_names(args.eval_attacks), eval_step=args.eval_step, eval_phases=_names(args.eval_phases),
        eval_n=args.eval_n,
        autoattack_n=args.autoattack_n)
    if args.admm:
        from .admm import ADMMConfig

        config.admm = ADMMConfig.from_dict(args.admm)
    model = _starting_model(args, train_set, device)
    check_plan(model, config)  # an unreachable ratio is refused before training and before any file is written
    out = _run_dir(args.out or _default_out("compress", args.model or "model", args.data, f"{args.ratio:g}x"),
                   force=args.force, resume=args.resume)
    _write_run_files(out, args, eps, device)
    print(f"cstar compress: {model.cstar_config['name'] if hasattr(model, 'cstar_config') else 'model'} on "
          f"{args.data}, target {args.ratio:g}x ({args.budget}), eps={eps:.4g}, output in {out}", flush=True)
    _print_defaults(args, device)
    results = compress(model, train_set, test_set, config, out, pretrained=args.checkpoint is not None,
                       resume=args.resume, val_size=args.val_size, seed=args.seed)
    print(f"\nparameters {results['params']['dense']:,} -> {results['params']['compressed']:,} "
          f"({results['params']['ratio']:.2f}x)" + (f", MACs {results['macs']['ratio']:.2f}x" if "macs" in results else ""))
    for phase, acc in results["accuracy"].items():
        print(f"  {phase:>16}: " + "  ".join(f"{k} {100 * v:.2f}%" for k, v in acc.items()))
    print(f"model in {out / 'model'}, report in {out / 'report.md'}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from .compare import CompareConfig, compare

    device = _device(args.device)
    train_set, test_set, eps, common = _pipeline_data(args)
    config = CompareConfig(
        ratios=_numbers(args.ratios, "--ratios"), methods=_names(args.methods),
        dense=_phase_config(args.dense, common), search=_phase_config({"epochs": 5, "lr": 0.01, **(args.search or {})}, common),
        finetune=_phase_config({"epochs": 5, "lr": 0.01, **(args.finetune or {})}, common),
        eval_attacks=_names(args.eval_attacks), eval_step=args.eval_step, eval_n=args.eval_n,
        autoattack_n=args.autoattack_n, latency_runs=args.latency_runs)
    if args.admm:
        from .admm import ADMMConfig

        config.admm = ADMMConfig.from_dict(args.admm)
    model = _starting_model(args, train_set, device)
    out = _run_dir(args.out or _default_out("compare", args.model or "model", args.data), force=args.force,
                   resume=args.resume)
    _write_run_files(out, args, eps, device)
    print(f"cstar compare: {', '.join(config.methods)} at {', '.join(f'{r:g}x' for r in config.ratios)} on "
          f"{args.data}, eps={eps:.4g}; {config.budget_text()}; output in {out}", flush=True)
    _print_defaults(args, device)
    compare(model, train_set, test_set, config, out, pretrained=args.checkpoint is not None,
            val_size=args.val_size, seed=args.seed)
    print((out / "comparison.md").read_text() if distributed.is_main() else "", end="")
    print(f"results in {out / 'results.json'}, table in {out / 'comparison.md'}")
    return 0


def _print_defaults(args: argparse.Namespace, device: torch.device) -> None:
    """Say which dataset preset the settings start from (recorded in env.json as ``defaults_preset``)."""
    if args.defaults_preset:
        print(f"settings: the {args.data} preset for {device.type.upper()} '{args.defaults_preset}' "
              f"(cstar/presets/{args.defaults_preset}.yaml), under the options given", flush=True)


def _names(text: str | None) -> list[str]:
    """The items of a comma-separated option (none for an empty or absent one)."""
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def _numbers(text: str, option: str) -> list[float]:
    try:
        return [float(t) for t in _names(text)]
    except ValueError:
        raise CstarError(f"{option} {text!r} must be comma-separated numbers, e.g. 4,8,16") from None


def cmd_demo(args: argparse.Namespace) -> int:
    """Dense PGD training on scikit-learn's digits, then CSTAR beside pruning and post-hoc low rank."""
    from ._demo import demo_config, run_demo

    config = demo_config(args.epochs, args.phase_epochs, tuple(_numbers(args.ratios, "--ratios")), args.seed)
    out = prepare_run_dir(args.out or _default_out("demo"), force=args.force)
    write_json(out / "env.json", environment("cpu", args.seed))
    run_demo(out, config, args.seed)
    return 0


def main(argv: list[str] | None = None) -> int:
    stdout = sys.stdout
    try:
        args = parse_args(argv)
        # under torchrun (WORLD_SIZE > 1): join the process group; only rank 0 prints and warns
        distributed.init_from_env(_device(getattr(args, "device", None) or "cpu"))
        with warnings.catch_warnings():
            if not distributed.is_main():
                sys.stdout = open(os.devnull, "w")
                warnings.simplefilter("ignore")  # every rank runs the same code: rank 0 has the same warnings
            return args.func(args)
    except CstarError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Interrupted as exc:
        print(f"interrupted: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if sys.stdout is not stdout:
            sys.stdout.close()
            sys.stdout = stdout
        distributed.shutdown()


if __name__ == "__main__":
    sys.exit(main())
