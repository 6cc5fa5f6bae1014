"""Devices, run directories and the files that record a run (``config.yaml``, ``env.json``)."""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

import torch
import yaml

from .. import distributed
from .._core.env import environment
from .._core.errors import CstarError
from .._core.io import atomic_write_text, write_json
from ..files.run_dirs import check_run_dir, prepare_run_dir

# Options that control the command itself and are not recorded in config.yaml.
NOT_SAVED = {"command", "config", "force", "resume", "defaults_preset"}
# The commands that write a run directory (--out, --force; all but demo also --resume).
RUN_COMMANDS = ("train", "compress", "compare", "demo")


def device_type(name: str) -> str:
    """"cuda" or "cpu": the kind of device ``--device name`` will be (auto: cuda when one is visible)."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cuda" if str(name).startswith("cuda") else "cpu"


def device(name: str) -> torch.device:
    """The device of ``--device name`` (auto, cpu, cuda, cuda:N); under torchrun, this process's GPU."""
    if name == "auto":
        name = device_type(name)
    if not re.fullmatch(r"cpu|cuda(:\d+)?", str(name)):
        raise CstarError(f"unknown device '{name}': use auto, cpu, cuda or cuda:N")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CstarError(f"--device {name} but no CUDA GPU is visible: use --device cpu, or install a CUDA build of torch")
    chosen = torch.device(name)
    if chosen.index is not None and chosen.index >= torch.cuda.device_count():
        raise CstarError(f"--device {name}, but the GPUs visible are cuda:0 to cuda:{torch.cuda.device_count() - 1}: "
                         "choose one of them")
    return distributed.local_device(chosen)  # under torchrun: cuda:LOCAL_RANK


def default_out(kind: str, *parts: str) -> Path:
    """``runs/<kind>-<parts>-<time>``, the output directory when ``--out`` is not given (a factory name's
    ``package.module:factory`` gives ``factory``)."""
    names = [p.rpartition(":")[2] for p in parts if p]
    return Path("runs") / "-".join([kind, *names, time.strftime("%Y%m%d-%H%M%S")])


def check_out(args: argparse.Namespace) -> None:
    """Refuse now, before any work, an ``--out`` (with ``--force``/``--resume``) that the run may not use
    (see :func:`cstar.files.run_dirs.check_run_dir`); nothing is touched."""
    if args.command not in RUN_COMMANDS:
        return
    resume = getattr(args, "resume", False)
    if resume and not args.out:
        raise CstarError(f"--resume continues the run in --out: pass --out DIR, the directory of the run "
                         f"(e.g. 'cstar {args.command} --resume --out runs/...')")
    if args.out:
        check_run_dir(args.out, args.command, force=args.force, resume=resume)


def refuse_overwrite(path: str | Path | None, option: str) -> None:
    """Refuse to replace an existing file or directory ``path`` (the command's ``option``) without --force."""
    if path is not None and (Path(path).exists() or Path(path).is_symlink()):
        raise CstarError(f"{path} already exists: pass --force to overwrite it, or choose another {option}")


def run_dir(path: str | Path, command: str, *, force: bool, resume: bool) -> Path:
    """:func:`prepare_run_dir` on rank 0 (under torchrun); every rank gets rank 0's path, or its refusal."""
    out, refusal = None, None
    if distributed.is_main():
        try:
            out = str(prepare_run_dir(path, command, force=force, resume=resume))
        except CstarError as exc:
            refusal = str(exc)
    out, refusal = distributed.broadcast_object((out, refusal))
    if refusal is not None:
        raise CstarError(refusal)
    return Path(out)


def write_run_files(out: Path, args: argparse.Namespace, eps: float, where: torch.device) -> None:
    """``config.yaml`` (the resolved options, what ``--resume`` reads back) and ``env.json``, from rank 0."""
    if distributed.is_main():
        saved = {k: v for k, v in vars(args).items() if k not in NOT_SAVED}
        atomic_write_text(out / "config.yaml", yaml.safe_dump({**saved, "eps": eps}, sort_keys=False))
        write_json(out / "env.json", {**environment(where, args.seed), "world_size": distributed.world_size(),
                                      "defaults_preset": getattr(args, "defaults_preset", None)})


def print_defaults(args: argparse.Namespace, where: torch.device) -> None:
    """Say which dataset preset the settings start from (recorded in env.json as ``defaults_preset``)."""
    if args.defaults_preset:
        named = args.config and Path(args.config).stem != args.defaults_preset  # not the preset itself
        given = f"--config {args.config} and the options given" if named else "the options given"
        print(f"settings: the {args.data} preset for {where.type.upper()} '{args.defaults_preset}' "
              f"(cstar/presets/{args.defaults_preset}.yaml), under {given}", flush=True)
