"""The commands of ``cstar`` and their options: what can be given, with help texts.

Nothing here decides a value beyond argparse's own defaults: :mod:`._options`
layers presets, ``--config`` and a resumed run's record over these.
"""

from __future__ import annotations

import argparse
import math
from fractions import Fraction

import yaml

from .. import data, models
from .._version import __version__
from .._core.checks import check_radius
from .._core.errors import CstarError
from .._core.renamed import old_name, renamed_value
from ..lowrank._spec import RUNTIMES
from ..pipeline import compressors
from ..training.fit import AMP_DTYPES, ATTACKS, OPTIMIZERS, SCHEDULES, TrainConfig

FACTORY_FORMS = "package.module:factory, torchvision:NAME, timm:NAME (with --model-arg KEY=VALUE)"
STEP_HELP = ("PGD step size for evaluation: one for every PGD attack, or per attack as pgd40=0.01,pgd5=0.1 "
             "(default: max(eps/4, 2.5*eps/k) for PGD-k)")


def parse_eps(text: str, what: str = "eps", *, positive: bool = False) -> float:
    """A radius given as a decimal (``0.3``) or a fraction (``8/255``), in [0, 1] (> 0 when ``positive``)."""
    try:
        value = float(Fraction(text.strip()))
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"'{text}' is not a number: write e.g. 0.3 or 8/255") from None
    try:
        return check_radius(what, value, positive=positive)
    except CstarError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_step(text: str) -> float | dict[str, float]:
    """An attack step: one for every PGD attack (``0.01``), or per attack (``pgd40=0.01,pgd5=0.1``)."""
    if "=" not in text:
        return parse_eps(text, "step", positive=True)
    steps = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, value = item.partition("=")
        if not name.strip() or not value.strip():
            raise argparse.ArgumentTypeError(f"'{item}' is not ATTACK=STEP: write e.g. pgd40=0.01,pgd5=0.1")
        steps[name.strip()] = parse_eps(value, "step", positive=True)
    return steps


def parse_normalize(text: str) -> str | list[float]:
    """``--normalize``: ``"data"``, ``"none"``, or numbers: MEAN,STD or the channels' means then their positive
    stds (their count is matched with the images' channels where the model is built)."""
    if text in ("data", "none"):
        return text
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    half = len(values) // 2
    if len(values) < 2 or len(values) % 2 or not all(map(math.isfinite, values)) or min(values[half:]) <= 0:
        raise argparse.ArgumentTypeError(f"--normalize {text!r}: write data, none, MEAN,STD (e.g. 0.5,0.25) or the "
                                         "channels' means then their positive stds, comma-separated")
    return values


def parse_budget(text: str) -> str:
    """``--budget``: what the ratio counts; an old name (``flops``) as its new one, noted."""
    return renamed_value(text, "budget", "the command line")


def yaml_mapping(text: str) -> dict:
    """A YAML mapping given on the command line, e.g. ``'{epochs: 3, lr: 0.01}'``."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"'{text}' is not a YAML mapping: write e.g. '{{epochs: 3, lr: 0.01}}'")
    return value


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (a CstarError), not a usage dump."""

    def error(self, message: str):
        raise CstarError(f"{self.prog}: {message} (see '{self.prog} --help')")


def build_parser() -> argparse.ArgumentParser:
    """The ``cstar`` parser; ``parser.subcommands`` maps each command name to its own parser."""
    parser = _Parser(prog="cstar", description="Compact, structured and adversarially robust CNNs.")
    parser.add_argument("--version", action="version", version=f"cstar {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add_command in (_train, _eval, _info, _compress, _compare, _ranks, _decompose, _export, _demo):
        add_command(sub)
    parser.subcommands = sub.choices
    return parser


# ----------------------------------------------------------------------------- option groups


class _OldName(argparse.Action):
    """A flag's old name: sets the new flag's option, with a :class:`FutureWarning` naming the new flag."""

    def __call__(self, parser, namespace, values, option_string=None):
        old_name(option_string, "--" + self.dest.replace("_", "-"))
        setattr(namespace, self.dest, values)


def _old_name(g, flag: str, dest: str) -> None:
    """Accept ``flag``, hidden from the help, as the old name of the option ``dest`` (same choices)."""
    new = next(a for a in g._group_actions if a.dest == dest)
    g.add_argument(flag, dest=dest, action=_OldName, type=new.type, choices=new.choices, default=new.default,
                   help=argparse.SUPPRESS)


def _data_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", help=f"dataset: {', '.join(sorted(data.DATASETS))}")
    g.add_argument("--root", default=None, help="dataset root folder (default: $CSTAR_DATA or ~/.cache/cstar/data)")
    g.add_argument("--download", action="store_true", help="download the official archive if it is missing")
    g.add_argument("--eps", type=parse_eps, default=None,
                   help="L-inf radius, e.g. 8/255 (default: the dataset's threat model: mnist 0.3, fashion_mnist 0.1, cifar 8/255)")


def _model_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", help=f"architecture: {', '.join(models.list_models())}, or a factory: "
                                   f"{FACTORY_FORMS}")
    g.add_argument("--width", type=int, default=None, help="base width of resnet18 / preact_resnet18 (64 in the paper)")
    g.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="extra keyword for the model builder, e.g. widen_factor=4 (repeatable)")
    _normalize_option(g)


def _normalize_option(g) -> None:
    g.add_argument("--normalize", default=None, metavar="data|none|MEAN,STD",
                   help="what the model's normalising front does to [0, 1] images: the dataset's mean and std "
                        "(data), nothing (none), or MEAN,STD; default data for a model cstar trains, none for "
                        "weights trained elsewhere (--checkpoint with --model FACTORY)")


def _factory_option(p: argparse.ArgumentParser, *, data: bool = False) -> None:
    """--model on commands that read a model from a file: the factory that built it, named to be imported;
    with its --model-arg and --normalize for weights trained elsewhere (and --data where the command has none)."""
    p.add_argument("--model", default=None, metavar="FACTORY",
                   help=f"the factory that built the model, when it is not a built-in ({FACTORY_FORMS}): cstar "
                        "imports a factory's code only when you name it")
    p.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="keyword for the factory, for weights trained elsewhere (repeatable)")
    _normalize_option(p)
    if data:
        p.add_argument("--data", default=None,
                       help="the dataset whose images the model takes, for weights trained elsewhere")


def _latency_options(g, timed: str) -> None:
    """Where a latency budget's ``timed`` things are timed: runtime, batch, threads."""
    g.add_argument("--runtime", choices=RUNTIMES, default=None,
                   help=f"where a latency budget's {timed} are timed (default: onnxruntime)")
    g.add_argument("--latency-batch", type=int, default=1, help="images per timed batch of a latency budget")
    g.add_argument("--latency-threads", type=int, default=None,
                   help="threads of the timed runtime (default: torch's, e.g. --threads)")


def _plan_options(g, *, ratio_default: float | None) -> None:
    """The rank-plan options on group (or parser) ``g``."""
    g.add_argument("--ratio", type=float, default=ratio_default,
                   help="target compression ratio, e.g. 16" + (f" (default: {ratio_default:g})" if ratio_default else ""))
    g.add_argument("--budget", type=parse_budget, choices=("params", "macs", "joint", "latency"), default="params",
                   help="what the ratio counts: parameters, MACs (multiply-accumulates), both (with --macs-ratio), "
                        "or the speed-up measured on --runtime (latency)")
    g.add_argument("--macs-ratio", type=float, default=None, help="target MACs ratio of a joint budget")
    g.add_argument("--speedup", type=float, default=None,
                   help="target speed-up measured on --runtime: the same as --budget latency --ratio S")
    _latency_options(g, "layers and plans")
    _old_name(g, "--flops-ratio", "macs_ratio")
    g.add_argument("--rank-method", choices=("global", "uniform"), default="global")
    g.add_argument("--exclude", default=None, help="comma-separated layers kept dense (default: first conv, classifier)")


def _pipeline_options(p: argparse.ArgumentParser, title: str):
    """The options compress and compare share (starting model, data, training attack, held-out and
    evaluation settings); returns the argument group ``title`` for the command's own options."""
    p.add_argument("--checkpoint", default=None,
                   help="dense robust model to start from (the model directory of 'cstar train', any cstar.save "
                        "directory, or an older run's model.pt); without it, one is trained")
    _model_options(p)
    _data_options(p)
    g = p.add_argument_group(title)
    g.add_argument("--attack", choices=ATTACKS, default=None, help="training attack of every phase (default: pgd)")
    _old_name(g, "--method", "attack")
    g.add_argument("--train-n", type=int, default=None, help="train on the first N training images only")
    g.add_argument("--val-size", type=int, default=1000, help="training images held out for per-epoch checks")
    g.add_argument("--eval-attacks", default="clean,pgd20")
    g.add_argument("--eval-eps", type=parse_eps, default=None,
                   help="L-inf radius of every evaluation, e.g. 8/255 (default: the training eps)")
    g.add_argument("--eval-step", type=parse_step, default=None, help=STEP_HELP)
    g.add_argument("--eval-n", type=int, default=None, help="evaluate on the first N test images (default: all)")
    return g


def _run_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("run")
    g.add_argument("--out", default=None, help="output directory (default: runs/<command>-<model>-<data>-<time>)")
    g.add_argument("--force", action="store_true",
                   help="empty an existing run directory of cstar's first (all of it: checkpoints, finished cells); "
                        "never another directory, a symbolic link, the working directory or home")
    g.add_argument("--config", default=None,
                   help="YAML/JSON file of option values, or a preset's name (command-line flags win)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    g.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars or per-epoch lines")


# ----------------------------------------------------------------------------- the commands


def _train(sub) -> None:
    t = sub.add_parser("train", help="adversarially train a dense model",
                       description="Adversarially train a model (PGD-AT, FGSM-RS, N-FGSM or TRADES) and evaluate it.")
    _model_options(t)
    _data_options(t)
    d = TrainConfig.__dataclass_fields__
    g = t.add_argument_group("training")
    g.add_argument("--attack", choices=ATTACKS, default="pgd", help="training attack/objective (default: pgd)")
    _old_name(g, "--method", "attack")
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
                   help="mixed precision: on CUDA bfloat16 autocast where the GPU supports it, else float16 with "
                   "loss scaling; on a CPU with AVX512-BF16 or AMX bfloat16 (see --amp-dtype)")
    g.add_argument("--amp-dtype", choices=AMP_DTYPES, default="auto",
                   help="the autocast type of --amp: auto (default: by the GPU; on the CPU bfloat16 where it is "
                   "native, else nothing), or bfloat16 or float16 on any device")
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
    e.add_argument("--eval-step", type=parse_step, default=None, help=STEP_HELP)
    e.add_argument("--eval-n", type=int, default=None, help="evaluate the first N test images (default: all)")
    _run_options(t)


def _eval(sub) -> None:
    ev = sub.add_parser("eval", help="evaluate a checkpoint under attack",
                        description="Clean, FGSM, PGD-k, AutoAttack and Square accuracy of a saved model, or of an "
                                    "exported graph (.onnx in onnxruntime, .xml in OpenVINO) with transfer attacks "
                                    "made on its float model (--source).")
    ev.add_argument("checkpoint", help="the model directory of 'cstar train' or 'compress' (any cstar.save directory), "
                                       "an older run's model.pt, a checkpoint.pt, or an exported graph (.onnx, .xml)")
    ev.add_argument("--source", default=None, metavar="FLOAT_MODEL",
                    help="for an exported graph: the float model it was exported from; the gradient attacks (fgsm, "
                         "pgdK, aa) are made on it and classified by the graph (transfer-pgd20...), and its recorded "
                         "dataset and eps are the defaults (--model and --normalize then apply to it)")
    _factory_option(ev)
    _data_options(ev)
    ev.add_argument("--attacks", default="clean,pgd20",
                    help="comma-separated: clean, fgsm, pgdK, aa, square or squareQ (gradient-free, Q queries; "
                         "default 5000) (default: clean,pgd20)")
    ev.add_argument("--step", type=parse_step, default=None, help=STEP_HELP.replace(" for evaluation", ""))
    ev.add_argument("--n", type=int, default=None, help="evaluate the first N test images (default: all)")
    ev.add_argument("--batch-size", type=int, default=256)
    ev.add_argument("--json", default=None, help="write a RobustBench-style JSON here (progress kept in JSON.partial)")
    ev.add_argument("--resume", action="store_true",
                    help="continue a killed evaluation with the same --json after its last finished batch")
    ev.add_argument("--force", action="store_true", help="overwrite an existing --json file")
    ev.add_argument("--per-example", action="store_true",
                    help="also keep in the --json which test images each attack left correct, for paired "
                         "comparisons of two models (cstar.paired_difference)")
    ev.add_argument("--device", default="auto")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--config", default=None, help="YAML/JSON file of option values")


def _info(sub) -> None:
    i = sub.add_parser("info", help="parameters and MACs per layer of a model",
                       description="Print a model's layers with parameters, MACs (multiply-accumulates) and output shapes.")
    i.add_argument("checkpoint", nargs="?", default=None, help="a checkpoint (or give --model)")
    _model_options(i)
    i.add_argument("--data", default=None, help="dataset whose input shape and classes to use (default: cifar10)")
    i.add_argument("--num-classes", type=int, default=None)
    i.add_argument("--config", default=None)


def _compress(sub) -> None:
    c = sub.add_parser("compress", help="CSTAR: robust low-rank compression to a target ratio",
                       description="Dense robust model -> global ranks -> ADMM adversarial training -> decomposition "
                                   "-> adversarial fine-tuning -> evaluation. Training sections (dense, search: the "
                                   "ADMM phase's, finetune) and admm take YAML mappings, e.g. --finetune "
                                   "'{epochs: 3, lr: 0.01}', or nested keys in --config (see configs/).")
    g = _pipeline_options(c, "compression")
    _plan_options(g, ratio_default=8.0)
    g.add_argument("--multiple-of", type=int, default=None,
                   help="round ranks to multiples of this (default: 1; 8 for a latency budget)")
    g.add_argument("--plan", default=None, help="ranks chosen beforehand: a plan JSON from 'cstar ranks --json' for "
                                                "the same model and target (instead of selecting them)")
    g.add_argument("--dense", type=yaml_mapping, default=None, help="dense training settings (YAML mapping)")
    g.add_argument("--search", type=yaml_mapping, default=None, help="ADMM-phase training settings")
    _old_name(g, "--admm-train", "search")
    g.add_argument("--admm", type=yaml_mapping, default=None, help="ADMM settings: rho, rho_growth, interval...")
    g.add_argument("--finetune", type=yaml_mapping, default=None, help="fine-tuning settings")
    g.add_argument("--eval-phases", default="dense,admm_projected,final",
                   help="models to evaluate: dense, admm_projected (ADMM model after the final projection), final")
    g.add_argument("--autoattack-n", type=int, default=0, help="AutoAttack the final model on the first N test images")
    g.add_argument("--resume", action="store_true", help="continue the run in --out where it stopped")
    _run_options(c)


def _compare(sub) -> None:
    m = sub.add_parser("compare", help="CSTAR beside robust channel pruning and post-hoc low rank, same budget",
                       description="From one dense robust model, run each method at each ratio with the same training "
                                   "budget (a first phase of --search epochs: ADMM for cstar, channel scores for hydra, "
                                   "fine-tuning for the others; then --finetune epochs), evaluate all with the same "
                                   "attacks, and write results.json, comparison.md and accuracy_vs_ratio.png. "
                                   "--resume reruns no finished (method, ratio) cell.")
    g = _pipeline_options(m, "comparison")
    g.add_argument("--ratios", default="4,16",
                   help="comma-separated parameter ratios, or speed-ups with --budget latency (default: 4,16)")
    g.add_argument("--budget", choices=("params", "latency"), default="params",
                   help="what the ratios are: parameter ratios (default), or speed-ups measured on --runtime "
                        "(latency: each method held to a structure timed there, every trained model timed at the end)")
    g.add_argument("--speedups", default=None,
                   help="comma-separated speed-ups measured on --runtime: the same as --budget latency --ratios LIST")
    _latency_options(g, "structures and models")
    g.add_argument("--methods", default="dense,cstar,hydra,magnitude,lowrank_global,lowrank_uniform",
                   help=f"comma-separated: dense and the registered methods ({', '.join(compressors.names())}; "
                        "what each does: cstar.pipeline.compressors; default: %(default)s)")
    g.add_argument("--dense", type=yaml_mapping, default=None, help="dense training settings (without --checkpoint)")
    g.add_argument("--search", type=yaml_mapping, default=None,
                   help="first-phase settings of every method (default epochs 5, lr 0.01)")
    g.add_argument("--finetune", type=yaml_mapping, default=None,
                   help="fine-tuning settings of every method (default epochs 5, lr 0.01)")
    g.add_argument("--admm", type=yaml_mapping, default=None, help="CSTAR's ADMM settings: rho, rho_growth, interval...")
    g.add_argument("--autoattack-n", type=int, default=0, help="AutoAttack every model on the first N test images")
    g.add_argument("--latency-runs", type=int, default=50, help="batch-1 CPU latency: median of N runs (0: off)")
    g.add_argument("--resume", action="store_true", help="continue the comparison in --out; finished cells are kept")
    _run_options(m)


def _ranks(sub) -> None:
    r = sub.add_parser("ranks", help="print the global rank plan for a target ratio",
                       description="Select Tucker-2/SVD ranks of every compressible layer for a target ratio and "
                                   "print the plan (ranks, parameters, MACs, retained energy).")
    r.add_argument("checkpoint", nargs="?", default=None, help="a trained model (else --model, randomly initialised)")
    _model_options(r)
    r.add_argument("--data", default=None, help="dataset whose input shape and classes to use (default: cifar10)")
    g = r.add_argument_group("rank plan")
    _plan_options(g, ratio_default=None)
    g.add_argument("--multiple-of", type=int, default=None,
                   help="round ranks to multiples of this (default: 1; 8 for a latency budget)")
    r.add_argument("--json", default=None, help="also write the plan as JSON here")
    r.add_argument("--force", action="store_true", help="overwrite an existing --json file")
    r.add_argument("--config", default=None)


def _decompose(sub) -> None:
    dc = sub.add_parser("decompose", help="factorise a dense model by a rank plan (no training)",
                        description="Select ranks for a ratio (or read a plan) and write the factorised model "
                                    "(cstar.save format). This is post-hoc low-rank compression, without ADMM.")
    dc.add_argument("checkpoint", help="the dense model: the model directory of 'cstar train' (any cstar.save "
                                       "directory) or an older run's model.pt")
    _factory_option(dc, data=True)
    g = dc.add_argument_group("rank plan")
    _plan_options(g, ratio_default=None)
    g.add_argument("--multiple-of", type=int, default=None,
                   help="round ranks to multiples of this (default: 1; 8 for a latency budget)")
    dc.add_argument("--plan", default=None, help="a plan JSON from 'cstar ranks --json' (instead of --ratio)")
    dc.add_argument("--n-iter", type=int, default=0, help="HOOI sweeps refining each Tucker-2 factorisation")
    dc.add_argument("--out", required=True, help="output directory of the factorised model")
    dc.add_argument("--force", action="store_true", help="replace an existing save in --out")
    dc.add_argument("--config", default=None)


def _export(sub) -> None:
    x = sub.add_parser("export", help="export a model to ONNX or TorchScript, or as INT8",
                       description="Export a saved model (cstar.save directory or checkpoint) for deployment; "
                                   "--int8 quantises it (post-training, static, per-channel weights), calibrated on "
                                   "its training images, for onnxruntime or OpenVINO.")
    x.add_argument("checkpoint", metavar="model", help="a cstar.save directory or a checkpoint.pt")
    _factory_option(x)
    x.add_argument("--data", default=None,
                   help="the dataset whose images the model takes (weights trained elsewhere), and whose training "
                        "images calibrate --int8 (default: the one the model records)")
    x.add_argument("--root", default=None, help="dataset root folder (default: the model's run's, else $CSTAR_DATA "
                                                "or ~/.cache/cstar/data)")
    x.add_argument("--download", action="store_true", help="download the official archive if it is missing")
    x.add_argument("--format", choices=("onnx", "torchscript"), default="onnx")
    x.add_argument("--out", required=True, help="output file (.onnx or .pt; with --int8 --runtime openvino, .xml)")
    q = x.add_argument_group("INT8")
    q.add_argument("--int8", action="store_true",
                   help="quantise to INT8 (weights int8 per output channel, symmetric) and report the share of "
                        "calibration images on which it predicts the float model's class")
    q.add_argument("--runtime", choices=("onnxruntime", "openvino"), default=None,
                   help="the INT8 model's runtime: onnxruntime (an .onnx file; default) or openvino (an .xml IR, "
                        "quantised by NNCF)")
    q.add_argument("--calibration-n", type=int, default=None,
                   help="calibration images: the first N of a shuffle (seeded by --seed) of the training set "
                        "(default: 256)")
    q.add_argument("--seed", type=int, default=0, help="seed of the calibration images' shuffle (default: 0)")
    x.add_argument("--force", action="store_true", help="overwrite an existing --out file")
    x.add_argument("--no-fold-bn", action="store_true",
                   help="keep BatchNorm nodes (default: folded into the convs, the same outputs within rounding)")
    x.add_argument("--config", default=None)


def _demo(sub) -> None:
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
    m.add_argument("--force", action="store_true", help="empty an existing demo run directory first")
    m.add_argument("--config", default=None)
