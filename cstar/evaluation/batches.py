"""What :func:`cstar.evaluate` reads, checked before any work: its arguments, its batches (images (N, C, H, W)
in [0, 1], integer labels), the model's first answer; and what identifies its model and data (for resume)."""

from __future__ import annotations

import hashlib
import itertools
import numbers
from collections.abc import Iterable

import torch
import torch.nn as nn

from .. import attacks
from .._core.errors import CstarError
from ..data import make_loader


def batches(data, n: int | None, batch_size: int, device: torch.device) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (x float in [0,1], y) batches of the first ``n`` examples of ``data`` on ``device``.

    ``data`` is a dataset with ``images``/``labels`` tensors (uint8 images are
    scaled by 1/255), an ``(images, labels)`` pair, or an iterable of batches.
    Each batch's shapes and types are checked (:func:`checked_batch`).
    """
    if hasattr(data, "images") and hasattr(data, "labels"):
        data = (data.images, data.labels)
    if is_pair(data):
        x_all, y_all = data
        if len(x_all) != len(y_all):
            raise CstarError(f"{len(x_all)} images but {len(y_all)} labels: pass matching images and labels")
        count = len(x_all) if n is None else min(n, len(x_all))
        for i in range(0, count, batch_size):
            yield checked_batch((x_all[i:min(i + batch_size, count)], y_all[i:min(i + batch_size, count)]), device)
        return
    if isinstance(data, torch.utils.data.Dataset):  # e.g. an image folder: stream it with workers
        data = make_loader(data, batch_size, train=False, device=device)
    seen = 0
    for batch in data:
        if n is not None and seen >= n:
            return
        x, y = checked_batch(batch, device)
        if n is not None and seen + len(y) > n:
            x, y = x[:n - seen], y[:n - seen]
        seen += len(y)
        yield x, y


def is_pair(data) -> bool:
    """Whether ``data`` is one ``(images, labels)`` pair rather than an iterable of batches."""
    if not (isinstance(data, (tuple, list)) and len(data) == 2):
        return False
    first = data[0]  # a batch, or the images themselves
    return not (isinstance(first, (tuple, list)) and len(first) > 0 and torch.is_tensor(first[0]))


def checked_batch(batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)`` of one batch on ``device``, x float in [0, 1] (uint8 scaled) of shape (N, C, H, W) and y
    integer class indices of shape (N,); one line naming the fix otherwise."""
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2 and all(map(torch.is_tensor, batch))):
        got = (f"a pair of {type(batch[0]).__name__} and {type(batch[1]).__name__}"
               if isinstance(batch, (tuple, list)) and len(batch) == 2 else f"a {type(batch).__name__}")
        raise CstarError(f"the data gives {got}, not (images, labels) tensors: pass torch tensors, e.g. "
                         "(torch.as_tensor(images), torch.as_tensor(labels)), a cstar dataset or a DataLoader")
    x, y = batch
    if x.dim() != 4:
        raise CstarError(f"images of shape {tuple(x.shape)}: pass a batch of shape (N, C, H, W)"
                         + (", e.g. x.unsqueeze(1) for one-channel images" if x.dim() == 3 else ""))
    if not (x.is_floating_point() or x.dtype == torch.uint8):
        raise CstarError(f"images of type {x.dtype}: pass floats in [0, 1] or uint8 in [0, 255]")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool or y.dim() != 1:
        one_hot = " (one-hot labels: y.argmax(1))" if y.dim() == 2 else ""
        raise CstarError(f"labels of type {y.dtype} and shape {tuple(y.shape)}: pass integer class indices of "
                         f"shape (N,), e.g. y.long(){one_hot}")
    if len(y) != len(x):
        raise CstarError(f"a batch of {len(x)} images but {len(y)} labels: pass one label per image")
    x = x.to(device)
    return (x.float() / 255 if x.dtype == torch.uint8 else x.float()), y.to(device)


def check_data(data) -> None:
    """Refuse data that :func:`_batches` cannot read (numpy arrays, lists, one tensor...) before any work."""
    if hasattr(data, "images") and hasattr(data, "labels"):
        data = (data.images, data.labels)
    if is_pair(data):
        if not all(map(torch.is_tensor, data)):
            raise CstarError(f"images and labels must be torch tensors, got {type(data[0]).__name__} and "
                             f"{type(data[1]).__name__}: pass (torch.as_tensor(images), torch.as_tensor(labels))")
        return
    if isinstance(data, torch.utils.data.Dataset) and not torch.is_tensor(data):
        return
    if torch.is_tensor(data) or type(data).__module__ == "numpy" or isinstance(data, (str, bytes)) \
            or not isinstance(data, Iterable):
        raise CstarError(f"data of type {type(data).__name__}: pass a cstar dataset, an (images, labels) pair of "
                         "torch tensors, or an iterable of (images, labels) batches such as a DataLoader")


def check_labels(y: torch.Tensor, classes: int) -> None:
    if ((y < 0) | (y >= classes)).any().item():
        raise CstarError(f"labels in [{y.min().item()}, {y.max().item()}] but the model predicts {classes} classes "
                         f"(0..{classes - 1}): pass the labels of the model's dataset, or a model built for its "
                         "classes")


def first_conv_channels(model: nn.Module) -> int | None:
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return None if conv is None else conv.in_channels


@torch.no_grad()
def classes_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor, data) -> int:
    """The number of classes ``model`` predicts, from its logits on the first batch ``(x, y)``, after checking
    that it takes the batch and gives finite logits for its labels (one line naming the fix otherwise)."""
    channels = first_conv_channels(model)
    if channels is not None and x.shape[1] != channels:
        raise CstarError(f"images with {x.shape[1]} channels but the model's first convolution takes {channels}: "
                         "pass images of the model's dataset (shape (N, C, H, W))")
    attacks.check_inputs(x, y, (0.0, 1.0))
    try:
        logits = model(x)
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CstarError(f"the model cannot take images of shape {tuple(x.shape)} ({reason}): pass images of the "
                         "size and channels it was built for") from None
    if not (torch.is_tensor(logits) and logits.dim() == 2 and len(logits) == len(x)):
        got = tuple(logits.shape) if torch.is_tensor(logits) else type(logits).__name__
        raise CstarError(f"the model returns {got}, not logits of shape ({len(x)}, classes): evaluate a classifier")
    if not torch.isfinite(logits).all():
        raise CstarError("the model's outputs on the first batch are NaN or Inf, so every prediction would be "
                         "class 0: evaluate weights saved before training diverged (or retrain with a lower lr)")
    classes = logits.shape[1]
    data_classes = getattr(data, "num_classes", None)
    if isinstance(data_classes, int) and data_classes > classes:
        raise CstarError(f"the data has {data_classes} classes but the model predicts {classes}: pass a model "
                         "built for the data's classes")
    check_labels(y, classes)
    return classes


def check_model(model, what: str = "model") -> None:
    """A module with parameters (or, an exported graph's, buffers), all finite (a diverged model's argmax(NaN)
    would count as class 0)."""
    if not isinstance(model, nn.Module) or next(itertools.chain(model.parameters(), model.buffers()), None) is None:
        raise CstarError(f"{what} must be a torch.nn.Module with parameters, got {type(model).__name__}: "
                         "pass the network itself")
    for name, tensor in itertools.chain(model.named_parameters(), model.named_buffers()):
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CstarError(f"the {what}'s {name} holds NaN or Inf, so its predictions mean nothing: evaluate "
                             "weights saved before training diverged (or retrain with a lower lr)")


def model_device(model: nn.Module) -> torch.device:
    """Where ``model``'s first parameter (else buffer) lives: where its batches go."""
    first = next(itertools.chain(model.parameters(), model.buffers()), None)
    return torch.device("cpu") if first is None else first.device


def check_gradients(model: nn.Module, x: torch.Tensor, attack: str) -> None:
    """Refuse the gradient attack ``attack`` on a model whose logits carry no gradient with respect to its input
    (an exported graph run by onnxruntime or OpenVINO), from two images of ``x``, before any attack runs."""
    x = x[:2].detach().clone().requires_grad_(True)
    with torch.enable_grad():
        logits = model(x)
    if not (torch.is_tensor(logits) and logits.requires_grad):
        raise CstarError(f"{attack} needs the model's gradients and its logits carry none (an exported graph): make "
                         "it on the float model as a transfer attack (evaluate(..., source=float_model), cstar eval "
                         "--source FLOAT_MODEL), or run 'square', which needs only the logits")


def check_counts(n, batch_size, seed) -> None:
    if n is not None and (isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1):
        raise CstarError(f"n={n!r}: evaluate a whole number >= 1 of examples, or pass n=None for the whole set")
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise CstarError(f"batch_size={batch_size!r} must be an integer >= 1: pass e.g. batch_size=256")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise CstarError(f"seed={seed!r} must be an integer: pass e.g. seed=0")


def weights_sha256(model: nn.Module) -> str:
    """SHA-256 of the model's state_dict: each entry's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        if not torch.is_tensor(value):
            digest.update(f"{name}={value!r};".encode())
            continue
        flat = value.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{value.dtype}:{tuple(value.shape)};".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def data_fingerprint(data) -> str:
    """What identifies the test data: a SHA-256 of its images and labels where they are tensors, else its type
    and size (and an image folder's file list)."""
    if hasattr(data, "images") and hasattr(data, "labels"):
        data = (data.images, data.labels)
    digest = hashlib.sha256()
    if is_pair(data) and all(map(torch.is_tensor, data)):
        for tensor in data:
            digest.update(f"{tensor.dtype}:{tuple(tensor.shape)};".encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()
    samples = getattr(data, "samples", None)
    if samples is not None:
        digest.update(repr(list(samples)).encode())
        return digest.hexdigest()
    size = len(data) if hasattr(data, "__len__") else "?"
    return f"{type(data).__name__} of {size} items"
