"""Where every option of every command gets its value: :func:`parse_args`.

Layers, lowest first: the parser's built-in defaults; for ``compress`` and
``compare`` the dataset's preset for the device (:func:`cstar.cli._presets.dataset_defaults`);
``--config`` (a file or a preset's name) or, with ``--resume --out DIR``, the
record ``DIR/config.yaml`` under it; the flags given. A section option
(``--dense``, ``--search``, ``--admm``, ``--finetune``) changes
only the keys it names of the section below it. The helpers at the end turn the
resolved text options into values (lists, numbers, training settings).
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import yaml

from . import _presets as presets
from .._core.checks import COUNT, POSITIVE, RATIO, SEED, check_mapping, flag, integer, number, one_of
from .._core.errors import CstarError
from ..pipeline.phases import EVALUATION_RULES, attack_names
from ..training.config import RULES as TRAIN_RULES
from .._core.renamed import SETTINGS, current_options, renamed
from ..files.run_dirs import recorded_command
from ..pipeline.admm import ADMMConfig
from ..lowrank import RankSpec
from ..models._external import is_external
from ..models._recorded import short
from ..training.fit import TrainConfig
from ._parser import build_parser, parse_eps, parse_normalize, parse_step
from ._runs import NOT_SAVED, check_out, device_type

# Options that hold a YAML mapping (a training, ADMM... section).
SECTIONS = presets.SECTIONS
# Options a resumed run may change; any other option given with --resume must equal the run's record.
_MAY_CHANGE_ON_RESUME = {"device", "no_progress", "out"}
_EVALUATION_OPTIONS = {"eval_attacks", "eval_eps", "eval_step", "eval_n", "autoattack_n", "latency_runs"}
# ... and those only some commands' resumes may change: train and compare re-evaluate; a comparison's cells are
# independent (each records its own budget and seed), so its resume may add or drop methods and ratios.
_ALSO_ON_RESUME = {"train": _EVALUATION_OPTIONS, "compare": _EVALUATION_OPTIONS | {"methods", "ratios"}}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options of the command line ``argv``, resolved through every layer (see the module).

    ``args.defaults_preset`` names the dataset preset applied (None: none).
    Raises :class:`CstarError` for an unknown option, a bad value or a resume
    that contradicts its record, before anything is read or written.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    sub = parser.subcommands[args.command]
    given = _given_options(argv, args.command)
    values = _config_values(args, sub) if args.config else {}
    from_file = set(values)
    recorded = {}
    if getattr(args, "resume", False) and getattr(args, "out", None) and "out" in {a.dest for a in sub._actions}:
        check_out(args)  # a run of this command is there to resume, before its record is read
        recorded = _recorded_options(args, sub, {**values, **given})
        _check_recorded_factory(recorded, {**values, **given}, args.out)
        values = {**recorded, **values}
    defaults_preset = None
    if args.command in ("compress", "compare") and not recorded:  # a resumed run's record is complete
        device = given.get("device", values.get("device", "auto"))
        defaults_preset, base = presets.dataset_defaults(args.command, given.get("data", values.get("data")),
                                                         device_type(device))
        values = _layered(base, values)
    merged = _layered(values, given)
    if values:
        sub.set_defaults(**values)
        args = _parsed_again(parser, argv)
    for key in SECTIONS:
        if key in merged:
            setattr(args, key, merged[key])
    check_values(args, sub, from_file - set(given), args.config)
    _speedup_target(args, given)
    args.defaults_preset = defaults_preset
    check_out(args)  # again: --out may come from --config
    return args


def _speedup_target(args: argparse.Namespace, given: dict) -> None:
    """``--speedup S`` as what it stands for, ``--budget latency --ratio S`` (compare's ``--speedups LIST``:
    ``--budget latency --ratios LIST``); refused beside another target."""
    if getattr(args, "speedups", None) is not None:
        if "ratios" in given:
            raise CstarError("--speedups LIST is a latency budget's --ratios LIST: pass one of --speedups and --ratios")
        if "budget" in given and args.budget != "latency":
            raise CstarError(f"--speedups are latency targets but --budget is {args.budget}: drop --budget")
        args.ratios, args.budget = args.speedups, "latency"
    if getattr(args, "speedup", None) is None:
        return
    if "ratio" in given:
        raise CstarError("--speedup S is a latency budget's --ratio S: pass one of --speedup and --ratio")
    if "budget" in given and args.budget != "latency":
        raise CstarError(f"--speedup is a latency target but --budget is {args.budget}: drop --budget")
    args.ratio, args.budget = args.speedup, "latency"


def _layered(below: dict, above: dict) -> dict:
    """``above`` over ``below``: sections (YAML mappings) merge key by key, other options replace."""
    out = {**below, **above}
    for key in SECTIONS:
        if isinstance(below.get(key), dict) and isinstance(above.get(key), dict):
            out[key] = {**below[key], **above[key]}
    return out


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
    args = _parsed_again(parser, argv)
    given = {k: v for k, v in vars(args).items() if k in plain and not isinstance(v, _Unset)}
    for action in sub._actions:
        if isinstance(action, argparse._AppendAction) and getattr(args, action.dest):
            given[action.dest] = getattr(args, action.dest)
    return given


def _parsed_again(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """``parser.parse_args(argv)`` once more: an old flag's name was noted by the first parse, and only there."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return parser.parse_args(argv)


def _load_config_file(path: str) -> dict:
    p = presets.resolve(path)  # a file, or the name of a shipped preset
    try:
        values = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise CstarError(f"config file {p} is not valid YAML/JSON ({str(exc).splitlines()[0]}): fix its syntax") from None
    if not isinstance(values, dict):
        raise CstarError(f"config file {p} must hold a mapping of option: value, not a {type(values).__name__}")
    return renamed({str(k).replace("-", "_"): v for k, v in values.items()}, f"config file {p}", names=SETTINGS)


def _config_values(args: argparse.Namespace, sub: argparse.ArgumentParser) -> dict:
    """The option values of ``--config``, checked against the command's options and typed as its flags."""
    values = _load_config_file(args.config)
    known = {a.dest for a in sub._actions} - {"help"} - NOT_SAVED
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
        elif isinstance(action, argparse._AppendAction) and isinstance(value, str):
            values[key] = [value]  # one KEY=VALUE, as one flag gives it (not its characters)
    try:
        for key in ("eps", "attack_step", "eval_eps"):
            if isinstance(values.get(key), str):
                values[key] = parse_eps(values[key])
        for key in ("step", "eval_step"):  # one step, or a mapping attack -> step
            if isinstance(values.get(key), str):
                values[key] = parse_step(values[key])
            elif isinstance(values.get(key), dict):
                values[key] = {name: parse_eps(v, "step", positive=True) if isinstance(v, str) else v
                               for name, v in values[key].items()}
    except argparse.ArgumentTypeError as exc:
        raise CstarError(f"{key} in {args.config}: {exc}") from None
    return values


def _radius(text: str, where: str) -> float:
    """:func:`parse_eps` of ``text`` (an option's value from ``where``), its error as one line."""
    try:
        return parse_eps(text)
    except argparse.ArgumentTypeError as exc:
        raise CstarError(f"{where}: {exc}") from None


# ----------------------------------------------------------------------------- checks of every resolved value


def _text(what: str, value: object) -> str:
    if not isinstance(value, str):
        raise CstarError(f"{what} must be text, got {value!r}")
    return value


def _key_values(what: str, value: object) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise CstarError(f"{what} must be KEY=VALUE text or a list of them, got {value!r}; e.g. [width=16]")
    return value


def _eval_attack_names(what: str, value: object) -> str:
    attack_names(what, names(_text(what, value)))  # an unknown attack is refused before training
    return value


def _normalization(what: str, value: object) -> str:
    """``--normalize`` as :func:`._parser.parse_normalize` reads it (from a flag, a config file or a record)."""
    try:
        parse_normalize(_text(what, value))
    except argparse.ArgumentTypeError as exc:
        raise CstarError(str(exc).replace("--normalize", what, 1)) from None
    return value


def _ratios(what: str, value: object) -> str:
    for ratio in numbers(_text(what, value), what):
        RATIO(what, ratio)
    return value


def _section(what: str, value: object) -> dict:
    return check_mapping(value, what, "{epochs: 3, lr: 0.01}")


# The rules of the options no Python config checks, or whose flag has another name than its setting; every
# other option takes the rule of the TrainConfig field of its name, else its flag's type's (see _rule).
FLAG_RULES = {
    "ratio": RATIO, "macs_ratio": RATIO, "speedup": RATIO, "multiple_of": POSITIVE, "latency_batch": POSITIVE,
    "latency_threads": POSITIVE, "n_iter": COUNT, "seed": SEED,
    "calibration_n": integer(1, fix="calibrate on e.g. 256 training images"),
    "val_size": integer(0, fix="training images held out for the per-epoch check (0: none)"),
    "train_n": integer(),  # its range is the training set's: cstar.cli._inputs.first_n
    "eval_attacks": _eval_attack_names, "attacks": _eval_attack_names,
    "eval_n": EVALUATION_RULES["eval_n"], "n": EVALUATION_RULES["eval_n"],
    "autoattack_n": EVALUATION_RULES["autoattack_n"], "eval_step": EVALUATION_RULES["eval_step"],
    "step": EVALUATION_RULES["eval_step"], "latency_runs": integer(0, fix="timed forward passes (0: off)"),
    "eps_warmup": TRAIN_RULES["eps_warmup_epochs"], "phase_epochs": TRAIN_RULES["epochs"],
    "width": integer(1, fix="the model's base width, e.g. 16"), "num_classes": integer(1, fix="e.g. 10"),
    "model_arg": _key_values, "ratios": _ratios, "speedups": _ratios, "normalize": _normalization, **dict.fromkeys(SECTIONS, _section),
}


def _rule(action: argparse.Action):
    """The check of ``action``'s option: :data:`FLAG_RULES`, a TrainConfig field's, else by the flag's kind."""
    if action.dest in FLAG_RULES:
        return FLAG_RULES[action.dest]
    if action.dest in TRAIN_RULES:
        return TRAIN_RULES[action.dest]
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        return flag()
    if action.choices:
        return one_of(action.choices)
    kinds = {int: integer(), float: number(), parse_eps: number(at_least=0, at_most=1)}
    return kinds.get(action.type, _text)


def check_values(args: argparse.Namespace, sub: argparse.ArgumentParser, from_file: set, config: str | None) -> None:
    """Check every option's value, from whichever layer it came (flag, ``--config``, preset, a resumed run's
    record), and store it normalised; one line naming the option (``from_file``: those ``config`` gave) and
    what it must be."""
    for action in sub._actions:
        value = getattr(args, action.dest, None)
        if action.dest == "help" or value is None:
            continue
        what = "--" + action.dest.replace("_", "-")
        if not action.option_strings or action.dest in TRAIN_RULES:  # a training setting: TrainConfig's name
            what = action.dest
        if action.dest in from_file:
            what = f"{action.dest} in {config}"
        setattr(args, action.dest, _rule(action)(what, value))


def _recorded_options(args: argparse.Namespace, sub: argparse.ArgumentParser, given: dict) -> dict:
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
    recorded = current_options(recorded)
    foreign = sorted(set(recorded) - {a.dest for a in sub._actions} - {"eps"})
    if foreign and recorded_command(args.out) is None:  # a run made before cstar-run.json named its command
        raise CstarError(f"{args.out} holds another command's run, not a 'cstar {args.command}' run ({record_path} "
                         f"names {', '.join(foreign[:4])}, which 'cstar {args.command}' does not take): resume it with "
                         "the command that made it, or choose another --out")
    may_change = _MAY_CHANGE_ON_RESUME | _ALSO_ON_RESUME.get(args.command, set())
    differences = [f"--{key.replace('_', '-')} {_shown(value)} (the run has {_shown(recorded[key])})"
                   for key, value in sorted(given.items())
                   if key in recorded and key not in may_change and not _same_option(value, recorded[key])]
    if differences:
        raise CstarError(f"cannot resume {args.out} with other settings: {'; '.join(differences)}; resume with "
                         f"just --resume --out {args.out} (it reads the rest from {record_path}), or start a new "
                         "run in another --out")
    return {key: value for key, value in recorded.items() if key not in NOT_SAVED}


def _check_recorded_factory(recorded: dict, given: dict, out: str) -> None:
    """A run record never names code to import: a factory it records (``model: package.module:factory``) is
    built on ``--resume`` only when the user names it again (``--model``, or ``model:`` in ``--config``)."""
    name = recorded.get("model")
    if is_external(name) and given.get("model") != name:
        raise CstarError(f"{Path(out) / 'config.yaml'} records the model factory {short(name)}, whose code cstar "
                         f"imports only when you name it: resume with --resume --out {out} --model {name} if you "
                         "trust that code")


def _same_option(a, b) -> bool:
    """``a`` (given now) equals ``b`` (recorded); a section agrees when every key it names does."""
    if isinstance(a, dict) and isinstance(b, dict):
        return all(key in b and _same_option(value, b[key]) for key, value in a.items())
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return abs(a - b) <= 1e-12 * max(1.0, abs(a), abs(b))
    return a == b


def _shown(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


# ----------------------------------------------------------------------------- resolved text -> values


def require(args: argparse.Namespace, *names: str) -> None:
    """One line naming the first of ``names`` that no layer gave."""
    for name in names:
        if getattr(args, name, None) is None:
            raise CstarError(f"--{name} is required: give it on the command line or as '{name}:' in --config")


def names(text: str | None) -> list[str]:
    """The items of a comma-separated option (none for an empty or absent one)."""
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def numbers(text: str, option: str) -> list[float]:
    """The numbers of a comma-separated option such as ``--ratios 4,8,16``."""
    try:
        return [float(t) for t in names(text)]
    except ValueError:
        raise CstarError(f"{option} {text!r} must be comma-separated numbers, e.g. 4,8,16") from None


def model_kwargs(pairs: list[str]) -> dict:
    """``["width=16", "dropout=0.1"]`` -> ``{"width": 16, "dropout": 0.1}`` (values parsed as YAML)."""
    out = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise CstarError(f"--model-arg '{pair}' is not KEY=VALUE: write e.g. --model-arg width=16")
        key, value = pair.split("=", 1)
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise CstarError(f"--model-arg '{pair}': the value is not YAML; quote lists as 'mean=[0.5, 0.5]'") from None
    return out


def rank_spec(args: argparse.Namespace) -> RankSpec:
    """The :class:`cstar.lowrank.RankSpec` of the rank-plan options."""
    require(args, "ratio")
    return RankSpec(args.ratio, budget=args.budget, macs_ratio=args.macs_ratio, method=args.rank_method,
                    exclude=names(args.exclude) or None, multiple_of=args.multiple_of, **latency_settings(args))


def latency_settings(args: argparse.Namespace) -> dict:
    """The latency budget's settings of the rank-plan options (RankSpec refuses them beside another budget)."""
    return {"runtime": args.runtime, "latency_batch": args.latency_batch, "latency_threads": args.latency_threads}


def train_config(args: argparse.Namespace, eps: float) -> TrainConfig:
    """The :class:`TrainConfig` of ``cstar train``'s flat training options."""
    return TrainConfig(
        attack=args.attack, epochs=args.epochs, batch_size=args.batch_size, eps=eps,
        attack_steps=args.attack_steps, attack_step=args.attack_step, eps_warmup_epochs=args.eps_warmup,
        trades_beta=args.trades_beta, optimizer=args.optimizer, lr=args.lr, momentum=args.momentum,
        weight_decay=args.weight_decay, schedule=args.schedule, warmup_epochs=args.warmup_epochs,
        grad_clip=args.grad_clip, amp=args.amp, amp_dtype=args.amp_dtype, channels_last=args.channels_last,
        check_size=args.check_size, overfit_guard=not args.no_overfit_guard, select=args.select, seed=args.seed,
        progress=not args.no_progress, sync_bn=args.sync_bn)


def _section_error(key: str, exc: CstarError) -> CstarError:
    """``exc`` (a setting of the section ``key``) naming the section's option, e.g. ``--admm rho must be...``."""
    return CstarError(f"--{key.replace('_', '-')} {exc}")


def phase_config(args: argparse.Namespace, key: str, common: dict, **defaults) -> TrainConfig:
    """The training section ``key`` of ``args`` (a YAML mapping) over ``defaults`` over the settings ``common``
    to every phase."""
    values = {**common, **defaults, **(getattr(args, key) or {})}
    try:
        for name in ("eps", "attack_step"):
            if isinstance(values.get(name), str):
                values[name] = _radius(values[name], name)
        return TrainConfig.from_dict(values)
    except CstarError as exc:
        raise _section_error(key, exc) from None


def admm_config(args: argparse.Namespace) -> ADMMConfig:
    """The :class:`cstar.pipeline.admm.ADMMConfig` of the ``--admm`` section (defaults without one)."""
    try:
        return ADMMConfig.from_dict(args.admm or {})
    except CstarError as exc:
        raise _section_error("admm", exc) from None
