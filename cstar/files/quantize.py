"""INT8 models: post-training static quantisation of the exported graph, calibrated on real images and checked
against the float model (:func:`export_int8`; :func:`quantize_file` for an ONNX file already written).

onnxruntime: ``quant_pre_process`` (shapes inferred, constants folded, as
onnxruntime advises), then ``quantize_static`` in the QDQ format: weights
int8, symmetric, one scale per output channel; activations uint8 per tensor,
MinMax ranges over the calibration images. OpenVINO: the ONNX graph read by
OpenVINO and quantised by NNCF (its post-training tool since OpenVINO 2024.0;
default preset: symmetric int8 weights per output channel and activations),
written as an IR (``.xml`` and ``.bin``, float weights kept in float32).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .._core.errors import CstarError
from .export import export, export_input_shape
from .exported import load_exported

RUNTIMES = {"onnxruntime": ".onnx", "openvino": ".xml"}  # the runtime, and the suffix of the file it reads
NEEDS = {"onnxruntime": (("onnx", "onnxruntime"), "export"),  # the packages each runtime's path imports, its extra
         "openvino": (("onnx", "openvino", "nncf"), "openvino-int8")}
CALIBRATION_N = 256
CALIBRATION_BATCH = 32  # images per calibration batch of onnxruntime (NNCF takes them one by one)


def check_runtime(runtime: object, path: str | os.PathLike | None = None) -> str:
    """``runtime`` when it is one of :data:`RUNTIMES`, installed, and ``path`` (if given) has its suffix."""
    if runtime not in RUNTIMES:
        raise CstarError(f"unknown INT8 runtime {runtime!r}: choose one of {', '.join(RUNTIMES)}")
    suffix = RUNTIMES[runtime]
    if path is not None and Path(path).suffix.lower() != suffix:
        kind = "an OpenVINO IR (.xml, its weights in the .bin beside it)" if runtime == "openvino" else "ONNX"
        raise CstarError(f"{runtime} INT8 models are written as {kind}: name the file {Path(path).stem}{suffix}")
    packages, extra = NEEDS[runtime]
    for package in packages:
        try:
            __import__(package)
        except ImportError:
            raise CstarError(f"INT8 export for {runtime} needs {package}: pip install 'cstar[{extra}]'") from None
    return runtime


def calibration_images(calibration, n: int = CALIBRATION_N, seed: int = 0) -> torch.Tensor:
    """The first ``n`` images of a seeded shuffle of ``calibration``, float32 in [0, 1], shape (n, C, H, W).

    ``calibration``: images (N, C, H, W) (float in [0, 1], or uint8 scaled by
    1/255), a cstar dataset or an ``(images, labels)`` pair, or a map-style
    dataset of ``(image, label)`` items (an image folder). The shuffle is
    ``torch.randperm(N)`` of a generator seeded with ``seed``; a set of fewer
    than ``n`` images gives all of them.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise CstarError(f"calibration n={n!r}: calibrate on a whole number >= 1 of images, e.g. 256")
    if hasattr(calibration, "images"):
        calibration = calibration.images
    elif isinstance(calibration, (tuple, list)) and len(calibration) == 2 and torch.is_tensor(calibration[0]):
        calibration = calibration[0]
    if not (torch.is_tensor(calibration) or isinstance(calibration, torch.utils.data.Dataset)) \
            or not len(calibration):
        raise CstarError(f"calibration of type {type(calibration).__name__} holds no images: pass images "
                         "(N, C, H, W), a cstar dataset or an (images, labels) pair, e.g. the training set")
    order = torch.randperm(len(calibration), generator=torch.Generator().manual_seed(seed))[:n]
    images = (calibration[order] if torch.is_tensor(calibration)
              else torch.stack([torch.as_tensor(calibration[int(i)][0]) for i in order]))
    if images.dim() != 4 or not (images.is_floating_point() or images.dtype == torch.uint8):
        raise CstarError(f"calibration images of type {images.dtype} and shape {tuple(images.shape[1:])}: pass "
                         "float images in [0, 1] or uint8 ones, each (C, H, W)")
    images = images.float() / 255 if images.dtype == torch.uint8 else images.float()
    if images.min().item() < 0 or images.max().item() > 1:
        raise CstarError("calibration images outside [0, 1]: pass them as the model takes them (normalisation "
                         "belongs inside the model)")
    return images.contiguous()


def quantize_file(onnx_path: str | os.PathLike, out: str | os.PathLike, images: np.ndarray,
                  runtime: str = "onnxruntime", input_name: str = "input") -> Path:
    """The ONNX file ``onnx_path`` quantised to INT8 for ``runtime``, calibrated on ``images`` (float32
    (N, C, H, W)), written to ``out`` (an ``.onnx`` file; for OpenVINO an ``.xml`` with its ``.bin``);
    returns ``out``. ``input_name``: the graph's input (``"input"`` in :func:`cstar.export`'s files)."""
    runtime, out = check_runtime(runtime, out), Path(out)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".cstar-int8-") as tmp:
        written = Path(tmp) / f"int8{out.suffix}"
        if runtime == "onnxruntime":
            _onnxruntime_int8(Path(onnx_path), written, images, input_name, Path(tmp))
        else:
            _openvino_int8(Path(onnx_path), written, images)
            os.replace(written.with_suffix(".bin"), out.with_suffix(".bin"))
        os.replace(written, out)
    return out


def _onnxruntime_int8(float_path: Path, out: Path, images: np.ndarray, input_name: str, tmp: Path) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Batches(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(range(0, len(images), CALIBRATION_BATCH))

        def get_next(self):
            start = next(self.batches, None)
            return None if start is None else {input_name: images[start:start + CALIBRATION_BATCH]}

    ready = tmp / "ready.onnx"
    quant_pre_process(str(float_path), str(ready))
    quantize_static(str(ready), str(out), Batches(), quant_format=QuantFormat.QDQ, per_channel=True,
                    weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8,
                    extra_options={"WeightSymmetric": True, "ActivationSymmetric": False})


def _openvino_int8(float_path: Path, out: Path, images: np.ndarray) -> None:
    import nncf
    import openvino as ov

    items = [images[i:i + 1] for i in range(len(images))]  # one image per item: NNCF's statistics assume it
    quantized = nncf.quantize(ov.Core().read_model(str(float_path)), nncf.Dataset(items), subset_size=len(items))
    ov.save_model(quantized, str(out), compress_to_fp16=False)


def export_int8(model: nn.Module, path: str | os.PathLike, calibration, *, n: int = CALIBRATION_N,
                runtime: str = "onnxruntime", seed: int = 0, input_shape: tuple[int, ...] | None = None,
                opset: int | None = None, fold_bn: bool = True) -> dict:
    """Export ``model`` as an INT8 graph for ``runtime`` at ``path``, calibrated on images of ``calibration``.

    ``calibration``: the images the model will see, e.g. its training set (see
    :func:`calibration_images`; the first ``n``, default 256, of a shuffle
    seeded with ``seed``). ``runtime`` "onnxruntime" writes ONNX (``path``
    ends in ``.onnx``), "openvino" an OpenVINO IR (``.xml``, and the ``.bin``
    beside it; needs ``pip install 'cstar[openvino-int8]'``); the module
    docstring says how each quantises. ``input_shape``, ``opset``,
    ``fold_bn``: as :func:`cstar.export`, which writes the float graph first.

    Returns ``{"path", "runtime" (name and version), "calibration_images",
    "seed", "top1_agreement"}``: the share of the calibration images on which
    the INT8 graph, run in ``runtime``, predicts the float model's class.
    Bad arguments are refused in one line before anything is written.
    """
    path = Path(path)
    if path.is_dir() or not path.parent.is_dir():
        raise CstarError(f"export target {path} must be a file path in an existing directory")
    check_runtime(runtime, path)
    images = calibration_images(calibration, n, seed)
    shape = export_input_shape(model, input_shape)
    if tuple(images.shape[1:]) != shape:
        raise CstarError(f"calibration images of shape {tuple(images.shape[1:])} but the model takes {shape}: "
                         "calibrate on images of its dataset")
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".cstar-float-") as tmp:
        float_path = export(model, Path(tmp) / "float.onnx", input_shape=shape, opset=opset, fold_bn=fold_bn)
        quantize_file(float_path, path, images.numpy(), runtime)
    int8 = load_exported(path)
    agree = 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in images.split(CALIBRATION_BATCH):
                reference = model(batch.to(next(model.parameters()).device)).argmax(1).cpu()
                agree += (int8(batch).argmax(1) == reference).sum().item()
    finally:
        model.train(was_training)
    return {"path": path, "runtime": int8.runtime, "calibration_images": len(images), "seed": seed,
            "top1_agreement": agree / len(images)}
