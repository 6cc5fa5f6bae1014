"""Export a model for deployment: ONNX or TorchScript, BatchNorm folded (:func:`export`)."""

from __future__ import annotations

import copy
import importlib.util
import io
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from .._core.errors import CstarError
from .._core.io import atomic_write_bytes
from ..inference import folded_or_same
from ..models import input_shape as models_input_shape


def export_input_shape(model: nn.Module, input_shape: tuple[int, ...] | None) -> tuple[int, ...]:
    """``input_shape`` (C, H, W) as integers, else the one ``model``'s ``cstar_config`` records."""
    if input_shape is not None:
        return tuple(int(v) for v in input_shape)
    shape = models_input_shape(model)
    if shape is not None:
        return shape
    raise CstarError("export needs the input shape of this model: pass input_shape=(C, H, W)")


def export(model: nn.Module, path: str | os.PathLike, format: str = "onnx",
           input_shape: tuple[int, ...] | None = None, opset: int | None = None, fold_bn: bool = True) -> Path:
    """Export ``model`` (a copy, in eval mode) to the file ``path``; returns the path.

    ``format`` "torchscript" traces with ``torch.jit.trace``; "onnx" uses torch's
    TorchScript-based ONNX exporter (``dynamo=False``: it needs only the ``onnx``
    package, not ``onnxscript``), with a dynamic batch dimension, input named
    "input" and output "logits"; ``opset`` defaults to torch's choice.
    ``input_shape`` (C, H, W) defaults to ``cstar_config``'s channels and size.
    ``fold_bn`` (default True): BatchNorm folded into the convs before export
    (:func:`cstar.inference.folded_or_same`; the same outputs within float
    rounding, fewer nodes for runtimes that do not fold it themselves).
    """
    if format not in ("onnx", "torchscript"):
        raise CstarError(f"unknown export format {format!r}: choose 'onnx' or 'torchscript'")
    path = Path(path)
    if path.is_dir() or not path.parent.is_dir():
        raise CstarError(f"export target {path} must be a file path in an existing directory")
    if format == "onnx" and importlib.util.find_spec("onnx") is None:
        raise CstarError("ONNX export needs the onnx package: pip install 'cstar[export]' (or pip install onnx)")
    shape = export_input_shape(model, input_shape)
    exported = folded_or_same(model) if fold_bn else model  # folding already returns a copy
    model = (copy.deepcopy(model) if exported is model else exported).eval()
    device = next(iter(model.parameters()), torch.empty(0)).device
    example = torch.rand(1, *shape, device=device)
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch 2.13 deprecates both TorchScript and this exporter
        if format == "torchscript":
            torch.jit.save(torch.jit.trace(model, example), buffer)
        else:
            torch.onnx.export(
                model, (example,), buffer, dynamo=False, opset_version=opset, input_names=["input"],
                output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            )
    return atomic_write_bytes(path, buffer.getvalue())
