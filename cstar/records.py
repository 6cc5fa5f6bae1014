"""Records of runs and measurements, for scripts and benchmarks: everything cstar's own records are made of.

- files written atomically (a killed script leaves the previous version, never half a file):
  :func:`write_json`, :func:`write_text`, :func:`write_bytes`;
- the machine a figure was measured on: :func:`machine` (CPU, GPU, threads, versions), :func:`describe_device`;
- a run's recorded options in today's names (records written before a rename read silently): :func:`run_config`,
  :func:`current_names`;
- comparisons (``cstar compare``'s ``results.json``): :func:`cell_name`, :func:`cell_model` (where a cell's
  model is saved), :func:`current_settings` (a cell's training record with the settings added since at their
  defaults), :func:`format_comparison`, :func:`plot_pareto`.

Models of every cstar format load with :func:`cstar.load` (a save directory, such as the ``model`` of ``cstar
train`` and ``compress``, or the ``model.pt`` of an older ``cstar train``); weights trained elsewhere with
:func:`cstar.load_weights`.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from ._core.env import describe_device, environment as machine
from ._core.errors import CstarError
from ._core.io import atomic_write_bytes as write_bytes, atomic_write_text as write_text, write_json
from ._core.renamed import current_options
from .pipeline.compare import cell_name, current_settings
from .pipeline.compare_report import format_comparison, plot_pareto
from .pipeline.compressors import cell_model

__all__ = ["cell_model", "cell_name", "current_names", "current_settings", "describe_device", "format_comparison",
           "machine", "plot_pareto", "run_config", "write_bytes", "write_json", "write_text"]


def current_names(record: dict) -> dict:
    """A run's recorded options with the options renamed since it was written under their new names (silently:
    a record cstar wrote is read as it is meant, e.g. ``method`` as ``attack``, ``admm_train`` as ``search``)."""
    return current_options(record)


def run_config(run: str | os.PathLike) -> dict:
    """The options a run recorded in ``run/config.yaml``, options renamed since under their new names."""
    path = Path(run) / "config.yaml"
    try:
        record = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise CstarError(f"cannot read {path} ({exc}): pass a run directory cstar wrote") from None
    if not isinstance(record, dict):
        raise CstarError(f"{path} is not a mapping of options: pass a run directory cstar wrote")
    return current_names(record)
