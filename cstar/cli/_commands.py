"""One function per ``cstar`` command: ``args`` (resolved by :func:`._options.parse_args`) -> exit code.

Each reads as the command's script: check the inputs, make the run directory,
do the work through the library, print where the results are.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from .. import data, distributed
from .._core.errors import CstarError
from .._core.io import write_json
from ..evaluation.counting import count_macs, count_params, format_table, layer_table
from ..attacks._spec import GRADIENT_FREE, parse_attack
from ..evaluation.evaluate import attack_specs, evaluate, format_results
from ..files.exported import is_exported, load_exported
from ..files.serialize import check_savable, check_save_target, record_trained_on, save
from ..pipeline.phases import evaluation_eps
from ..training.fit import fit
from . import _inputs as inputs
from . import _runs as runs
from ._options import (admm_config, latency_settings, names, numbers, phase_config, rank_spec, require,
                       train_config)


def cmd_train(args: argparse.Namespace) -> int:
    require(args, "model", "data")
    device = runs.device(args.device)
    train_set, test_set, eps = inputs.train_and_test(args)
    config = train_config(args, eps)
    eval_attacks = _checked_attacks(args.eval_attacks, "--eval-attacks", eps, args.eval_step)
    torch.manual_seed(args.seed)  # the initial weights
    model = inputs.build_model(args, train_set.spec, train_set.num_classes).to(device)
    try:  # a model that save() could not keep is refused before training, not after
        check_savable(model)
    except CstarError as exc:
        raise CstarError(f"{exc.args[0].split('; use export')[0]}: cstar train keeps its model with cstar.save, so "
                         "train this one from Python (cstar.fit) and keep it with cstar.export") from None
    train_part, val = inputs.validation(train_set, test_set, args.val_size, config.check_size, device)
    if len(train_part) < config.batch_size * distributed.world_size():
        held_out = len(train_set) - len(train_part)
        held = f" (after the {held_out} held out by --val-size)" if held_out else ""
        raise CstarError(f"{len(train_part)} training images{held} make less than one batch of --batch-size "
                         f"{config.batch_size} per process: give more images (--train-n), a smaller --val-size "
                         "or a smaller --batch-size")
    loader = data.make_loader(train_part, config.batch_size, train=True, device=device, seed=args.seed,
                              rank=distributed.rank(), world_size=distributed.world_size())
    out = runs.run_dir(args.out or runs.default_out("train", args.model, args.data), "train", force=args.force,
                       resume=args.resume)
    runs.write_run_files(out, args, eps, device)
    print(f"cstar train: {args.model} on {args.data} ({len(train_part)} train / {len(test_set)} test images), "
          f"{args.attack} eps={eps:.4g}, {count_params(model):,} parameters, device {device}; output in {out}")
    t0 = time.perf_counter()
    history = fit(model, loader, config, val=val, out_dir=out, resume=args.resume)
    train_seconds = time.perf_counter() - t0
    if distributed.is_main():
        record_trained_on(model, args.data, eps)
        save(model, out / "model")
    result = evaluate(model, test_set, eval_attacks, eps=eps, step=args.eval_step, n=args.eval_n,
                      seed=args.seed, out_path=out / "results.json",
                      meta={"model": args.model, "dataset": args.data, "attack": args.attack,
                            "epochs_run": len(history), "train_seconds": round(train_seconds, 1)})
    print(format_results({f"{args.model} ({args.attack})": result}))
    print(f"trained in {train_seconds / 60:.1f} min; results in {out / 'results.json'}, model in {out / 'model'}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    if args.resume and not args.json:
        raise CstarError("--resume continues the evaluation whose progress sits beside its --json: pass --json")
    if args.per_example and not args.json:
        raise CstarError("--per-example keeps its results in the --json card: pass --json")
    if not (args.resume or args.force):
        runs.refuse_overwrite(args.json, "--json")
    attack_names = _checked_attacks(args.attacks, "--attacks")
    device = runs.device(args.device)
    spec = inputs.dataset_spec(args.data)
    exported = is_exported(args.checkpoint)
    if exported:
        model, source, state = _exported_and_source(args, attack_names, device, spec)
    else:
        if args.source:
            raise CstarError(f"--source goes with an exported graph (.onnx, .xml); {args.checkpoint} is a model cstar "
                             "attacks through its own gradients: drop --source")
        model, state = inputs.model_and_state(args, args.checkpoint, device, spec, spec and spec.num_classes)
        inputs.check_model_options(args, model)
        source = None
    described = model if source is None else source  # the model whose record names the data, eps and architecture
    name, test_set, eps = _eval_data(args, args.source or args.checkpoint, described, state)
    meta = {"model": getattr(described, "cstar_config", {}).get("name", "model"), "dataset": name,
            "checkpoint": str(args.checkpoint)}
    if exported:
        meta.update(runtime=model.runtime, **({"source": str(args.source)} if source is not None else {}))
    result = evaluate(model, test_set, attack_names, eps=eps, step=args.step, n=args.n,
                      batch_size=args.batch_size, seed=args.seed, out_path=args.json, progress=True,
                      resume=args.resume, per_example=args.per_example, source=source, meta=meta)
    path = Path(args.checkpoint)  # a run's model (model, model.pt) is named by its run
    label = path.name if exported or not (path.is_file() or path.name == "model") else path.parent.name
    print(format_results({label or "model": result}))
    ran = f"; {model.runtime}" if exported else ""
    ran += f", transfer attacks made on {args.source}" if source is not None else ""
    print(f"{result['subset']} of the {name} test set, eps={eps:.4g}{ran}; seconds per attack: {result['seconds']}")
    if exported and any(label.startswith("square") for label in result["attacks"]):
        print(SQUARE_ON_A_GRAPH)
    return 0


# Measured on a CSTAR-compressed CIFAR-10 model (docs/RESULTS.md, "INT8 models evaluated honestly").
SQUARE_ON_A_GRAPH = ("note: Square on an exported graph measures that graph's outputs only; on an INT8 graph it found "
                     "7.5 points fewer adversarial examples than on the same model's float32 graph (CIFAR-10, 16x): "
                     "quote the worst figure over attacks, transfer attacks from --source included")


def _exported_and_source(args: argparse.Namespace, attack_names: list[str], device: torch.device, spec):
    """(the exported graph of ``cstar eval``, its --source model or None, the source's record or None).

    Refused before either is read: a gradient attack without --source (the graph has no gradients), and
    --model / --normalize without --source (they describe a float model)."""
    gradient = [a for a in attack_names if a.strip().lower() != "clean"
                and parse_attack(a, 1.0).name not in GRADIENT_FREE]
    if gradient and not args.source:
        raise CstarError(f"{args.checkpoint} is an exported graph without gradients, so {gradient[0]} must be made "
                         "on the float model it came from: pass --source FLOAT_MODEL (a transfer attack), or run "
                         "only clean and square on it")
    flags = [flag for flag, value in (("--model", args.model), ("--normalize", args.normalize)) if value]
    if flags and not args.source:
        raise CstarError(f"{flags[0]} describes a float model, and {args.checkpoint} is an exported graph: drop it "
                         "(or pass the float model as --source)")
    model = load_exported(args.checkpoint)
    if not args.source:
        return model, None, None
    source, state = inputs.model_and_state(args, args.source, device, spec, spec and spec.num_classes)
    return model, source, state


def _checked_attacks(text: str | None, option: str, eps: float | None = None, step=None) -> list[str]:
    """The attack names of ``option``, refused when there are none; with ``eps``, also checked (and a step too
    short to cross the eps-ball warned about) with ``step``, before any training or file."""
    attack_names = names(text)
    if not attack_names:
        raise CstarError(f"{option} {text!r} names no attack: give e.g. {option} clean,pgd20")
    if eps is not None:
        attack_specs(attack_names, eps, step=step)
    return attack_names


def _eval_data(args: argparse.Namespace, path: str, model: torch.nn.Module, state: dict | None):
    """(dataset name, test set, eps) of ``cstar eval``: --data, else what the model at ``path`` (the checkpoint,
    or an exported graph's --source) or its run says; --eps, else the eps the model was trained at, else (another
    dataset) that dataset's own."""
    trained_on, recorded_root = inputs.trained_on(path, state)
    name = args.data or trained_on
    if name is None:
        also = " (or --source, the float model it was exported from)" if is_exported(path) else ""
        raise CstarError(f"which dataset? {path} does not say: pass --data{also}")
    root = args.root if args.root is not None else recorded_root
    test_set = data.load(name, root, split="test", download=args.download)
    inputs.check_fits_data(model, path, name, test_set.spec, test_set.num_classes)
    if args.eps is not None:
        return name, test_set, args.eps
    if trained_on in (None, name):
        return name, test_set, inputs.recorded_eps((state or {}).get("eps", test_set.spec.eps), path)
    print(f"note: {path} was trained on {trained_on}; evaluating on {name} at its eps "
          f"{test_set.spec.eps:g} (pass --eps to choose)", flush=True)
    return name, test_set, test_set.spec.eps


def cmd_info(args: argparse.Namespace) -> int:
    model = inputs.model_for_planning(args)
    shape = inputs.input_shape(model)
    print(format_table(layer_table(model, shape)))
    factorised = getattr(model, "cstar_lowrank", None)
    if factorised:
        print("\nfactorised layers (Tucker-2 ranks are r_out, r_in):")
        for name, layer in factorised.items():
            print(f"  {name:<28} {layer['kind']:<8} ranks {', '.join(map(str, layer['ranks']))}")
    print(f"parameters: {count_params(model):,}   MACs per image: {count_macs(model, shape):,}   input: {tuple(shape)}")
    return 0


def cmd_ranks(args: argparse.Namespace) -> int:
    from ..lowrank import select_ranks

    if not args.force:
        runs.refuse_overwrite(args.json, "--json")
    torch.manual_seed(0)
    plan = select_ranks(inputs.model_for_planning(args), rank_spec(args))
    print(plan.table())
    if args.json:
        plan.save(args.json)
        print(f"plan written to {args.json}")
    return 0


def cmd_decompose(args: argparse.Namespace) -> int:
    from ..lowrank import RankPlan, decompose, select_ranks

    if not args.force:
        runs.refuse_overwrite(args.out, "--out")
    check_save_target(args.out)
    model = inputs.model_for_reading(args)
    plan = RankPlan.load(args.plan) if args.plan else select_ranks(model, rank_spec(args))
    factorised = decompose(model, plan, n_iter=args.n_iter)
    out = save(factorised, args.out)
    print(plan.table())
    print(f"factorised model written to {out} ({count_params(model):,} -> {count_params(factorised):,} parameters)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from ..files.export import export

    int8_only = [flag for flag, value in (("--runtime", args.runtime), ("--calibration-n", args.calibration_n))
                 if value is not None]
    if int8_only and not args.int8:
        raise CstarError(f"{int8_only[0]} sets the INT8 export: add --int8, or drop it")
    if args.int8 and args.format != "onnx":
        raise CstarError(f"--int8 writes ONNX (or, with --runtime openvino, an OpenVINO IR), not {args.format}: "
                         f"drop --format {args.format}")
    if not args.force:
        runs.refuse_overwrite(args.out, "--out")
    if args.int8:
        return _export_int8(args)
    model = inputs.model_for_reading(args)
    path = export(model, args.out, format=args.format, input_shape=inputs.input_shape(model),
                  fold_bn=not args.no_fold_bn)
    print(f"{args.format} model written to {path}")
    return 0


def _export_int8(args: argparse.Namespace) -> int:
    """``cstar export --int8``: the model quantised for --runtime, calibrated on its dataset's training images."""
    from ..files.quantize import CALIBRATION_N, check_runtime, export_int8

    runtime = check_runtime(args.runtime or "onnxruntime", args.out)  # the file's suffix, the packages
    spec = inputs.dataset_spec(args.data)
    model, state = inputs.model_and_state(args, args.checkpoint, torch.device("cpu"), spec, spec and spec.num_classes)
    inputs.check_model_options(args, model)
    trained_on, recorded_root = inputs.trained_on(args.checkpoint, state)
    name = args.data or trained_on
    if name is None:
        raise CstarError(f"which calibration images? {args.checkpoint} does not record its dataset: pass --data "
                         "(and --root), whose training images calibrate the INT8 model")
    train_set = data.load(name, args.root if args.root is not None else recorded_root, split="train",
                          download=args.download)
    inputs.check_fits_data(model, args.checkpoint, name, train_set.spec, train_set.num_classes)
    result = export_int8(model, args.out, train_set, n=args.calibration_n or CALIBRATION_N, runtime=runtime,
                         seed=args.seed, input_shape=inputs.input_shape(model), fold_bn=not args.no_fold_bn)
    print(f"INT8 model for {result['runtime']} written to {result['path']}; calibrated on "
          f"{result['calibration_images']} {name} training images (seed {args.seed}), on which it predicts the float "
          f"model's class for {100 * result['top1_agreement']:.2f}%")
    return 0


def _common_phase_settings(args: argparse.Namespace, eps: float) -> dict:
    """The training settings every phase of compress and compare shares (eps, seed, progress, --attack)."""
    common = {"eps": eps, "seed": args.seed, "progress": not args.no_progress}
    if args.attack:
        common["attack"] = args.attack
    return common


def cmd_compress(args: argparse.Namespace) -> int:
    from ..lowrank import RankPlan
    from ..pipeline.compress import CompressConfig, compress, plan_ahead

    device = runs.device(args.device)
    train_set, test_set, eps = inputs.train_and_test(args)
    common = _common_phase_settings(args, eps)
    config = CompressConfig(
        ratio=args.ratio, budget=args.budget, macs_ratio=args.macs_ratio, rank_method=args.rank_method,
        exclude=names(args.exclude) or None, multiple_of=args.multiple_of, **latency_settings(args),
        dense=phase_config(args, "dense", common),
        search=phase_config(args, "search", common), admm=admm_config(args),
        finetune=phase_config(args, "finetune", common, epochs=5, lr=0.01),
        eval_attacks=_checked_attacks(args.eval_attacks, "--eval-attacks", evaluation_eps(args.eval_eps, eps),
                                      args.eval_step),
        eval_eps=args.eval_eps, eval_step=args.eval_step, eval_phases=names(args.eval_phases),
        eval_n=args.eval_n, autoattack_n=args.autoattack_n)
    model = inputs.starting_model(args, train_set, device)
    pretrained = args.checkpoint is not None
    # an unreachable ratio is refused before training and before any file is written; a pretrained model's plan is
    # selected here, once (a resumed run's ranks may be recorded already: compress selects them if not)
    chosen = RankPlan.load(args.plan) if args.plan else None
    plan = plan_ahead(model, config.rank_spec(), pretrained=pretrained and not args.resume, plan=chosen)
    out = runs.run_dir(args.out or runs.default_out("compress", args.model or "model", args.data, f"{args.ratio:g}x"),
                       "compress", force=args.force, resume=args.resume)
    runs.write_run_files(out, args, eps, device)
    print(f"cstar compress: {model.cstar_config['name'] if hasattr(model, 'cstar_config') else 'model'} on "
          f"{args.data}, target {args.ratio:g}x ({args.budget}), eps={eps:.4g}, output in {out}", flush=True)
    runs.print_defaults(args, device)
    results = compress(model, train_set, test_set, config, out, pretrained=pretrained, resume=args.resume,
                       val_size=args.val_size, seed=args.seed, plan=plan)
    print(f"\nparameters {results['params']['dense']:,} -> {results['params']['compressed']:,} "
          f"({results['params']['ratio']:.2f}x)" + (f", MACs {results['macs']['ratio']:.2f}x" if "macs" in results else ""))
    for phase, acc in results["accuracy"].items():
        print(f"  {phase:>16}: " + "  ".join(f"{k} {100 * v:.2f}%" for k, v in acc.items()))
    print(f"model in {out / 'model'}, report in {out / 'report.md'}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from ..pipeline.compare import CompareConfig, check_reachable, compare

    device = runs.device(args.device)
    train_set, test_set, eps = inputs.train_and_test(args)
    common = _common_phase_settings(args, eps)
    config = CompareConfig(
        ratios=numbers(args.ratios, "--ratios"), methods=names(args.methods),
        dense=phase_config(args, "dense", common),
        search=phase_config(args, "search", common, epochs=5, lr=0.01),
        finetune=phase_config(args, "finetune", common, epochs=5, lr=0.01), admm=admm_config(args),
        eval_attacks=_checked_attacks(args.eval_attacks, "--eval-attacks", evaluation_eps(args.eval_eps, eps),
                                      args.eval_step),
        eval_eps=args.eval_eps, eval_step=args.eval_step, eval_n=args.eval_n,
        autoattack_n=args.autoattack_n, latency_runs=args.latency_runs, budget=args.budget,
        **latency_settings(args))
    model = inputs.starting_model(args, train_set, device)
    check_reachable(model, config)  # a ratio no rank plan reaches is refused before any work, as compress does
    out = runs.run_dir(args.out or runs.default_out("compare", args.model or "model", args.data), "compare",
                       force=args.force, resume=args.resume)
    runs.write_run_files(out, args, eps, device)
    targets = ', '.join(f'{r:g}x' for r in config.ratios) + (" faster" if config.budget == "latency" else "")
    print(f"cstar compare: {', '.join(config.methods)} at {targets} on "
          f"{args.data}, eps={eps:.4g}; {config.budget_text()}; output in {out}", flush=True)
    runs.print_defaults(args, device)
    compare(model, train_set, test_set, config, out, pretrained=args.checkpoint is not None,
            val_size=args.val_size, seed=args.seed)
    print((out / "comparison.md").read_text() if distributed.is_main() else "", end="")
    print(f"results in {out / 'results.json'}, table in {out / 'comparison.md'}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Dense PGD training on scikit-learn's digits, then CSTAR beside pruning and post-hoc low rank."""
    from ._demo import demo_config, run_demo
    from .._core.env import environment

    config = demo_config(args.epochs, args.phase_epochs, tuple(numbers(args.ratios, "--ratios")), args.seed)
    out = runs.run_dir(args.out or runs.default_out("demo"), "demo", force=args.force, resume=False)
    write_json(out / "env.json", environment("cpu", args.seed))
    run_demo(out, config, args.seed)
    return 0


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "info": cmd_info, "ranks": cmd_ranks, "decompose": cmd_decompose,
            "export": cmd_export, "compress": cmd_compress, "compare": cmd_compare, "demo": cmd_demo}
