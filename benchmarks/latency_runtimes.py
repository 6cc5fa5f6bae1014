"""The runtime paths of ``bench_latency.py`` that start from the ONNX file ``cstar.export`` writes.

Float: ``onnxruntime`` (CPU provider, all graph optimisations) and ``openvino``
(CPU plugin, latency performance hint, float32 inference precision: on CPUs with
bfloat16 units OpenVINO's default is bfloat16, which is not the float model).
INT8 (post-training static quantisation by the package's own
:func:`cstar.files.quantize.quantize_file`, as ``cstar export --int8`` does,
calibrated on ``CALIBRATION_IMAGES`` random images of the input shape, uniform
in [0, 1] like the timed batch: the benchmark takes no dataset and its models
have random weights, so random images stand in for real ones; a trained model
deserves real calibration images, which ``cstar export --int8`` takes from its
training set): ``onnxruntime_int8`` (QDQ, symmetric per-channel int8 weights,
MinMax ranges; run like ``onnxruntime``) and ``openvino_int8`` (NNCF on the
model OpenVINO reads from the same ONNX file; run like ``openvino``). Each model
is exported and quantised once and reused for every batch size. A missing
package raises ImportError naming the extra that installs it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from cstar import export
from cstar.files.quantize import quantize_file

FLOAT = ("onnxruntime", "openvino")
INT8 = ("onnxruntime_int8", "openvino_int8")
CALIBRATION_IMAGES = 64
CHECK_IMAGES = 64  # INT8 paths are compared with eager mode on this many fresh random images (rounded up to batches)
Forward = Callable[[torch.Tensor], torch.Tensor]


def _need(module: str, extra: str):
    try:
        return __import__(module)
    except ImportError:
        raise ImportError(f"not installed: {module} (pip install 'cstar[{extra}]')") from None


def versions() -> dict[str, str | None]:
    """The version of each runtime package, None where it does not import."""
    out = {}
    for name in ("onnxruntime", "openvino", "nncf"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = None
    return out


def random_images(n: int, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """``n`` images uniform in [0, 1] from their own generator (the global one is left alone)."""
    return torch.rand(n, *shape, generator=torch.Generator().manual_seed(seed))


def calibration_images(shape: tuple[int, ...]):
    """The calibration images, a numpy array (``CALIBRATION_IMAGES``, *shape)."""
    return random_images(CALIBRATION_IMAGES, shape, seed=1).numpy()


def onnx_file(model: nn.Module, shape: tuple[int, ...], workdir: Path, stem: str) -> Path:
    """``model`` exported once by :func:`cstar.export` (dynamic batch) to ``workdir/stem.onnx``."""
    path = workdir / f"{stem}.onnx"
    return path if path.exists() else export(model, path, input_shape=shape)


def onnxruntime_forward(path: Path, threads: int) -> Forward:
    """An onnxruntime CPU session of the ONNX file ``path``, all graph optimisations, ``threads`` intra-op threads."""
    ort = _need("onnxruntime", "export")
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(session.run(None, {"input": x.numpy()})[0])


def openvino_forward(path: Path, batch_shape: tuple[int, ...], threads: int) -> Forward:
    """The model at ``path`` (ONNX or OpenVINO IR) compiled for the CPU plugin at the static input ``batch_shape``."""
    ov = _need("openvino", "openvino")
    core = ov.Core()
    model = core.read_model(str(path))
    model.reshape(list(batch_shape))
    compiled = core.compile_model(model, "CPU", {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads,
                                                 "INFERENCE_PRECISION_HINT": "f32"})
    request = compiled.create_infer_request()

    def forward(x: torch.Tensor) -> torch.Tensor:
        request.infer({0: x.numpy()}, share_inputs=True)
        return torch.from_numpy(request.get_output_tensor(0).data.copy())

    return forward


def onnxruntime_int8_file(path: Path, shape: tuple[int, ...]) -> Path:
    """``path`` quantised once for onnxruntime (:func:`cstar.files.quantize.quantize_file`) into
    ``<stem>_ort_int8.onnx``."""
    _need("onnxruntime", "export")
    out = path.with_name(f"{path.stem}_ort_int8.onnx")
    return out if out.exists() else quantize_file(path, out, calibration_images(shape), "onnxruntime")


def openvino_int8_file(path: Path, shape: tuple[int, ...]) -> Path:
    """``path`` read by OpenVINO and quantised once by NNCF (:func:`cstar.files.quantize.quantize_file`) into
    ``<stem>_ov_int8.xml``."""
    _need("openvino", "openvino")
    _need("nncf", "openvino-int8")
    out = path.with_name(f"{path.stem}_ov_int8.xml")
    return out if out.exists() else quantize_file(path, out, calibration_images(shape), "openvino")


def runtime_forward(path_name: str, model: nn.Module, batch_shape: tuple[int, ...], threads: int, workdir: Path,
                    stem: str) -> Forward:
    """The forward function of ``model`` along the runtime path ``path_name`` for inputs of ``batch_shape``."""
    _need("onnxruntime", "export") if path_name.startswith("onnxruntime") else _need("openvino", "openvino")
    if path_name == "openvino_int8":
        _need("nncf", "openvino-int8")
    shape = tuple(batch_shape[1:])
    onnx = onnx_file(model, shape, workdir, stem)
    if path_name == "onnxruntime":
        return onnxruntime_forward(onnx, threads)
    if path_name == "openvino":
        return openvino_forward(onnx, batch_shape, threads)
    if path_name == "onnxruntime_int8":
        return onnxruntime_forward(onnxruntime_int8_file(onnx, shape), threads)
    if path_name == "openvino_int8":
        return openvino_forward(openvino_int8_file(onnx, shape), batch_shape, threads)
    raise ValueError(f"unknown runtime path {path_name!r}")


def int8_agreement(model: nn.Module, forward: Forward, batch_shape: tuple[int, ...]) -> dict:
    """An INT8 path against eager mode on ``CHECK_IMAGES`` fresh random images, fed in batches of the timed size.

    Returns the max |logit difference| relative to the eager model's max |logit|,
    the share of images whose top-1 class agrees, and how many distinct classes
    eager mode predicts on them (random weights often predict one class for all
    images, and then agreement says little).
    """
    batch = batch_shape[0]
    images = random_images(math.ceil(CHECK_IMAGES / batch) * batch, tuple(batch_shape[1:]), seed=2)
    with torch.inference_mode():
        reference = model(images)
        got = torch.cat([forward(images[i:i + batch]) for i in range(0, len(images), batch)])
    return {"relative_error": (got - reference).abs().max().item() / reference.abs().max().clamp_min(1e-12).item(),
            "top1_agreement": (got.argmax(1) == reference.argmax(1)).float().mean().item(),
            "check_images": len(images), "eager_classes": int(reference.argmax(1).unique().numel())}
