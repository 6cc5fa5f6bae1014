"""Tests of cstar.data: official formats, downloads, errors and batch loaders."""

import functools
import gzip
import hashlib
import http.server
import io
import os
import pickle
import socket
import tarfile
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cstar._core.errors import CstarError
from cstar.pipeline.phases import split_held_out
from cstar.data import (DATASETS, BatchLoader, FolderData, FolderLoader, TensorData, download, load,
                        make_loader)
from cstar.data._augment import random_crop, random_flip
from cstar.data._download import extract_tar
from cstar.data._load import SOURCES

MNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
               "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


# ---------------------------------------------------------------- writers of the official formats

def write_idx_gz(path: Path, array: np.ndarray) -> None:
    """An idx file of unsigned bytes: 0, 0, 0x08, ndim, big-endian uint32 dims, payload; gzipped."""
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_mnist(folder: Path, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Tiny MNIST (5 train, 3 test images) in ``folder``; returns what was written by file name."""
    arrays = dict(zip(MNIST_FILES, (rng.integers(0, 256, (5, 28, 28)), rng.integers(0, 10, 5),
                                    rng.integers(0, 256, (3, 28, 28)), rng.integers(0, 10, 3))))
    for name, array in arrays.items():
        write_idx_gz(folder / name, array)
    return arrays


def write_pickle(path: Path, obj, protocol: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj, protocol=protocol))


def write_cifar10(root: Path, rng: np.random.Generator):
    """Tiny cifar-10-batches-py (5 x 2 train rows, 3 test rows), bytes keys as in the official files.

    Returns (train rows, train labels, test rows, test labels).
    """
    folder = root / "cifar-10-batches-py"
    train_rows, train_labels = rng.integers(0, 256, (10, 3072), dtype=np.uint8), rng.integers(0, 10, 10)
    test_rows, test_labels = rng.integers(0, 256, (3, 3072), dtype=np.uint8), rng.integers(0, 10, 3)
    train_labels, test_labels = train_labels.tolist(), test_labels.tolist()
    for b in range(5):
        rows = slice(2 * b, 2 * b + 2)
        write_pickle(folder / f"data_batch_{b + 1}",
                     {b"data": train_rows[rows], b"labels": train_labels[rows]}, 2)
    write_pickle(folder / "test_batch", {b"data": test_rows, b"labels": test_labels}, 2)
    return train_rows, train_labels, test_rows, test_labels


def write_cifar100(root: Path, rng: np.random.Generator) -> tuple[np.ndarray, list[int]]:
    """Tiny cifar-100-python/{train,test} with fine and coarse labels."""
    rows, fine = rng.integers(0, 256, (4, 3072), dtype=np.uint8), [99, 0, 57, 12]
    for split in ("train", "test"):
        write_pickle(root / "cifar-100-python" / split,
                     {"data": rows, "fine_labels": fine, "coarse_labels": [19, 0, 3, 7]}, 4)
    return rows, fine


def tar_gz(path: Path, folder: Path) -> str:
    """Pack ``folder`` (as its own name) into ``path``; return the archive's md5."""
    with tarfile.open(path, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    return hashlib.md5(path.read_bytes()).hexdigest()


def assert_cifar_rows(images: torch.Tensor, rows: np.ndarray) -> None:
    """Each 3072-byte row is the 32x32 R plane, then G, then B."""
    for image, row in zip(images, rows):
        for c in range(3):
            assert np.array_equal(image[c].numpy(), row[c * 1024:(c + 1) * 1024].reshape(32, 32))


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture
def http_root(tmp_path):
    """A folder served over HTTP on 127.0.0.1 (ephemeral port); yields (folder, base URL)."""
    served = tmp_path / "served"
    served.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def tiny_tensor_data(n: int = 10, shape=(3, 6, 5), spec=None) -> TensorData:
    """Distinct nonzero pixels (1..255) and label i for image i, so any output traces back."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(1, 256, (n, *shape), generator=generator, dtype=torch.uint8)
    spec = spec or replace(DATASETS["cifar10"], num_classes=n, image_shape=shape)
    return TensorData(images, torch.arange(n), spec)


# ---------------------------------------------------------------- real files

REAL = os.environ.get("CSTAR_TEST_DATA")
REAL_CIFAR10 = os.environ.get("CSTAR_TEST_CIFAR10")
needs_real = pytest.mark.skipif(
    not REAL, reason="set CSTAR_TEST_DATA to a root holding MNIST/raw and FashionMNIST/raw")
needs_cifar10 = pytest.mark.skipif(
    not REAL_CIFAR10, reason="set CSTAR_TEST_CIFAR10 to a root holding cifar-10-batches-py")


@needs_real
def test_real_mnist_sizes_labels_and_class_counts():
    train, test = load("mnist", REAL, "train"), load("mnist", REAL, "test")
    assert (len(train), len(test)) == (60000, 10000)
    assert train.images.shape == (60000, 1, 28, 28) and train.images.dtype == torch.uint8
    assert train.labels[:5].tolist() == [5, 0, 4, 1, 9] and test.labels[:3].tolist() == [7, 2, 1]
    assert train.labels.bincount().tolist() == [
        5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert test.labels.bincount().tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@needs_real
def test_real_fashion_mnist_is_balanced():
    train, test = load("fashion_mnist", REAL, "train"), load("fashion-mnist", REAL, "test")
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert train.labels.bincount().tolist() == [6000] * 10
    assert test.labels.bincount().tolist() == [1000] * 10
    assert train.labels[0] == 9


@needs_real
@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_real_files_match_the_official_md5s(tmp_path, name):
    source = SOURCES[name]
    for file in sum(source.files.values(), ()):
        download((Path(REAL) / source.folder / file).as_uri(), tmp_path / file, md5=source.md5[file])
    assert sorted(os.listdir(tmp_path)) == sorted(source.md5)


@needs_cifar10
def test_real_cifar10_sizes_and_labels():
    train, test = load("cifar10", REAL_CIFAR10, "train"), load("cifar10", REAL_CIFAR10, "test")
    assert train.images.shape == (50000, 3, 32, 32) and test.images.shape == (10000, 3, 32, 32)
    assert train.labels.bincount().tolist() == [5000] * 10
    assert test.labels.bincount().tolist() == [1000] * 10
    assert train.labels[:5].tolist() == [6, 9, 9, 4, 1]


# ---------------------------------------------------------------- specs

def test_specs_follow_the_threat_models_and_augmentations():
    assert set(DATASETS) == {
        "mnist", "fashion_mnist", "cifar10", "cifar100", "svhn", "digits", "imagefolder"}
    assert DATASETS["mnist"].eps == 0.3 and DATASETS["cifar10"].eps == 8 / 255
    assert DATASETS["imagefolder"].eps == 4 / 255
    assert (DATASETS["svhn"].augment, DATASETS["svhn"].crop_padding) == ("crop", 4)
    assert DATASETS["mnist"].augment == "none" and DATASETS["cifar100"].num_classes == 100
    for spec in DATASETS.values():
        assert len(spec.mean) == len(spec.std) == spec.image_shape[0]


# ---------------------------------------------------------------- tiny official files

def test_mnist_idx_files_round_trip(tmp_path, rng):
    arrays = write_mnist(tmp_path / "MNIST" / "raw", rng)
    train, test = load("mnist", tmp_path, "train"), load("mnist", tmp_path, "test")
    assert train.images.shape == (5, 1, 28, 28) and train.labels.dtype == torch.int64
    assert np.array_equal(train.images[:, 0].numpy(), arrays[MNIST_FILES[0]])
    assert np.array_equal(test.images[:, 0].numpy(), arrays[MNIST_FILES[2]])
    assert test.labels.tolist() == arrays[MNIST_FILES[3]].tolist()


def test_fashion_mnist_reads_its_own_folder(tmp_path, rng):
    arrays = write_mnist(tmp_path / "FashionMNIST" / "raw", rng)
    data = load("fashion_mnist", tmp_path, "train")
    assert data.labels.tolist() == arrays[MNIST_FILES[1]].tolist()


def test_cifar10_pickles_round_trip_planes_and_labels(tmp_path, rng):
    train_rows, train_labels, test_rows, test_labels = write_cifar10(tmp_path, rng)
    train, test = load("cifar10", tmp_path, "train"), load("cifar10", tmp_path, "test")
    assert train.images.shape == (10, 3, 32, 32) and train.labels.tolist() == train_labels
    assert_cifar_rows(train.images, train_rows)
    assert_cifar_rows(test.images, test_rows)
    assert test.labels.tolist() == test_labels


def test_cifar100_uses_fine_labels(tmp_path, rng):
    rows, fine = write_cifar100(tmp_path, rng)
    data = load("cifar100", tmp_path, "test")
    assert data.labels.tolist() == fine and data.num_classes == 100
    assert_cifar_rows(data.images, rows)


def test_svhn_mat_transposes_and_maps_label_10_to_0(tmp_path, rng):
    scipy_io = pytest.importorskip("scipy.io")
    x = rng.integers(0, 256, (32, 32, 3, 4), dtype=np.uint8)
    (tmp_path / "SVHN").mkdir()
    y = np.array([[10], [1], [9], [10]], np.uint8)
    scipy_io.savemat(tmp_path / "SVHN" / "train_32x32.mat", {"X": x, "y": y})
    data = load("svhn", tmp_path, "train")
    assert data.labels.tolist() == [0, 1, 9, 0]
    assert np.array_equal(data.images[2].numpy(), x[..., 2].transpose(2, 0, 1))


def test_digits_split_is_first_1437_then_360():
    pytest.importorskip("sklearn")
    train, test = load("digits", split="train"), load("digits", split="test")
    assert (len(train), len(test), train.num_classes) == (1437, 360, 10)
    assert train.images.shape[1:] == (1, 8, 8) and int(train.images.max()) == 255
    assert train.labels[:10].tolist() == list(range(10))


def test_take_and_subset(tmp_path):
    data = tiny_tensor_data(10)
    assert data.take(3).labels.tolist() == [0, 1, 2] and len(data.take(100)) == 10
    sub = data.subset([7, 2])
    assert sub.labels.tolist() == [7, 2] and torch.equal(sub.images[0], data.images[7])


# ---------------------------------------------------------------- image folders

def write_image_folder(root: Path) -> dict[str, np.ndarray]:
    """train/{cat,dog} and val/{cat,dog} PNGs of several sizes; returns pixel arrays by relative path."""
    pixels = {}
    gen = np.random.default_rng(1)
    for split in ("train", "val"):
        for cls, size in (("dog", (32, 32)), ("cat", (40, 36))):
            for k in range(2):
                rel = f"{split}/{cls}/{k}.png"
                pixels[rel] = gen.integers(0, 256, (*size, 3), dtype=np.uint8)
                (root / split / cls).mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels[rel]).save(root / rel)
    return pixels


def test_image_folder_classes_labels_and_center_crop(tmp_path):
    pixels = write_image_folder(tmp_path)
    data = load("imagefolder", tmp_path, "test", image_size=28)  # no test/: reads val/
    assert isinstance(data, FolderData) and data.folder == tmp_path / "val"
    assert data.classes == ["cat", "dog"]
    assert data.num_classes == 2 and data.spec.image_shape == (3, 28, 28)
    assert [label for _, label in data.samples] == [0, 0, 1, 1]
    image, label = data[2]  # a 32x32 dog: 28 * 256 / 224 = 32, so no resize, centre crop only
    assert label == 1 and image.dtype == torch.uint8
    assert np.array_equal(image.numpy(), pixels["val/dog/0.png"][2:30, 2:30].transpose(2, 0, 1))


def test_a_folder_dataset_is_checked_on_the_first_images_of_its_validation_folder(tmp_path):
    write_image_folder(tmp_path)
    train, val_folder = load("imagefolder", tmp_path, "train", image_size=28), load("imagefolder", tmp_path, "test",
                                                                                   image_size=28)
    part, (x, y) = split_held_out(train, 3, "cpu", val_folder)
    assert part is train and x.shape == (3, 3, 28, 28) and y.tolist() == [0, 0, 1]
    assert torch.equal(x[2], val_folder[2][0].float() / 255)
    assert split_held_out(train, 3, "cpu") == (train, None)  # no validation folder given: no check


def test_image_folder_random_crop_is_seeded(tmp_path):
    write_image_folder(tmp_path)
    data = load("imagefolder", tmp_path, "train", image_size=16).with_augment("crop_flip", seed=(0, 0))
    first, again = data[1][0], data[1][0]
    assert first.shape == (3, 16, 16) and torch.equal(first, again)
    assert not torch.equal(first, data.with_augment("crop_flip", seed=(0, 1))[1][0])


def test_image_folder_loader_batches_are_deterministic_across_workers(tmp_path):
    write_image_folder(tmp_path)
    data = load("imagefolder", tmp_path, "train", image_size=16)
    loaders = [make_loader(data, 3, train=True, num_workers=w, seed=5) for w in (0, 2)]
    assert isinstance(loaders[0], FolderLoader) and len(loaders[0]) == 1
    (x0, y0), = list(loaders[0])
    (x2, y2), = list(loaders[1])
    assert x0.shape == (3, 3, 16, 16) and x0.dtype == torch.float32 and 0 <= x0.min() <= x0.max() <= 1
    assert torch.equal(x0, x2) and torch.equal(y0, y2) and y0.dtype == torch.int64


# ---------------------------------------------------------------- downloads

def test_download_cifar10_archive_over_http(tmp_path, rng, http_root, monkeypatch):
    served, url = http_root
    train_rows, train_labels, _, _ = write_cifar10(tmp_path / "build", rng)
    md5 = tar_gz(served / "cifar-10-python.tar.gz", tmp_path / "build" / "cifar-10-batches-py")
    monkeypatch.setitem(SOURCES["cifar10"].md5, "cifar-10-python.tar.gz", md5)
    data = load("cifar10", tmp_path / "root", "train", download=True, mirror=url)
    assert data.labels.tolist() == train_labels
    assert_cifar_rows(data.images, train_rows)
    # Present now: a second download=True fetches nothing, even from an unreachable mirror.
    again = load("cifar10", tmp_path / "root", "test", download=True, mirror="http://127.0.0.1:9/")
    assert len(again) == 3


def test_download_mnist_from_file_url_mirror_env(tmp_path, rng, monkeypatch):
    arrays = write_mnist(tmp_path / "mirror", rng)
    for name in MNIST_FILES:
        md5 = hashlib.md5((tmp_path / "mirror" / name).read_bytes()).hexdigest()
        monkeypatch.setitem(SOURCES["mnist"].md5, name, md5)
    monkeypatch.setenv("CSTAR_MIRROR", (tmp_path / "mirror").as_uri())
    data = load("mnist", tmp_path / "root", "test", download=True)
    assert data.labels.tolist() == arrays[MNIST_FILES[3]].tolist()
    assert sorted(os.listdir(tmp_path / "root" / "MNIST" / "raw")) == sorted(MNIST_FILES[2:])


def test_download_checksum_mismatch_leaves_nothing(tmp_path, rng, http_root, monkeypatch):
    served, url = http_root
    write_cifar100(tmp_path / "build", rng)
    tar_gz(served / "cifar-100-python.tar.gz", tmp_path / "build" / "cifar-100-python")
    monkeypatch.setitem(SOURCES["cifar100"].md5, "cifar-100-python.tar.gz", "0" * 32)
    with pytest.raises(CstarError, match="checksum mismatch.*expected 0{32}"):
        load("cifar100", tmp_path / "root", "train", download=True, mirror=url)
    assert list((tmp_path / "root").rglob("*")) == []


def test_download_verifies_sha256_and_skips_a_present_file(tmp_path, http_root):
    served, url = http_root
    (served / "blob.bin").write_bytes(b"payload")
    dest = tmp_path / "out" / "blob.bin"
    sha = hashlib.sha256(b"payload").hexdigest()
    assert download(url + "blob.bin", dest, sha256=sha) == dest and dest.read_bytes() == b"payload"
    (served / "blob.bin").unlink()
    assert download(url + "blob.bin", dest, sha256=sha) == dest  # already there: no request made


def test_download_unreachable_url_names_it(tmp_path):
    with socket.socket() as s:  # a port that was just free: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(CstarError, match=f"127.0.0.1:{port}/x.gz"):
        download(f"http://127.0.0.1:{port}/x.gz", tmp_path / "x.gz")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["../evil.txt", "/tmp/evil.txt", "link"])
def test_extract_tar_rejects_unsafe_members(tmp_path, name):
    archive = tmp_path / "bad.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo(name)
        if name == "link":
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(info)
        else:
            info.size = 4
            tar.addfile(info, io.BytesIO(b"evil"))
    with pytest.raises(CstarError, match="unsafe member"):
        extract_tar(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "evil.txt").exists()


# ---------------------------------------------------------------- errors

def test_unknown_name_lists_valid_names():
    with pytest.raises(CstarError, match="unknown dataset 'mnits'.*fashion_mnist.*imagefolder"):
        load("mnits")


def test_bad_split():
    with pytest.raises(CstarError, match="unknown split 'valid'"):
        load("mnist", split="valid")


def test_missing_dataset_names_path_and_fix(tmp_path):
    with pytest.raises(CstarError, match=f"MNIST not found in {tmp_path}/MNIST/raw .*download=True"):
        load("mnist", tmp_path)


def test_default_root_comes_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("CSTAR_DATA", str(tmp_path / "env-root"))
    with pytest.raises(CstarError, match=str(tmp_path / "env-root" / "cifar-10-batches-py")):
        load("cifar10")


def test_not_gzip_is_corrupt(tmp_path, rng):
    write_mnist(tmp_path / "MNIST" / "raw", rng)
    (tmp_path / "MNIST" / "raw" / MNIST_FILES[0]).write_bytes(b"not gzip at all")
    with pytest.raises(CstarError, match="train-images-idx3-ubyte.gz is corrupt .*gzip"):
        load("mnist", tmp_path)


def test_bad_idx_magic_is_corrupt(tmp_path, rng):
    write_mnist(tmp_path / "MNIST" / "raw", rng)
    with gzip.open(tmp_path / "MNIST" / "raw" / MNIST_FILES[2], "wb") as f:
        f.write(bytes([0, 0, 0x0D, 3]) + bytes(12))  # float type code
    with pytest.raises(CstarError, match="bad idx magic 0x00000d03"):
        load("mnist", tmp_path, "test")


def test_truncated_idx_payload_is_corrupt(tmp_path, rng):
    write_mnist(tmp_path / "MNIST" / "raw", rng)
    path = tmp_path / "MNIST" / "raw" / MNIST_FILES[0]
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[:-10]))
    with pytest.raises(CstarError, match=r"idx dims \(5, 28, 28\) need 3920 bytes, found 3910"):
        load("mnist", tmp_path)


def test_garbage_pickle_is_corrupt(tmp_path, rng):
    write_cifar10(tmp_path, rng)
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(b"\x80\x02garbage")
    with pytest.raises(CstarError, match="test_batch is corrupt"):
        load("cifar10", tmp_path, "test")


class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_pickle_naming_a_callable_is_refused_without_running_it(tmp_path, rng):
    write_cifar100(tmp_path, rng)
    marker = tmp_path / "pwned"
    write_pickle(tmp_path / "cifar-100-python" / "train", {"data": _Exploit(marker)}, 2)
    with pytest.raises(CstarError, match="refusing global .*mkdir"):
        load("cifar100", tmp_path, "train")
    assert not marker.exists()


def test_corrupt_svhn_mat(tmp_path):
    (tmp_path / "SVHN").mkdir()
    (tmp_path / "SVHN" / "test_32x32.mat").write_bytes(b"MATLAB? no")
    with pytest.raises(CstarError, match="test_32x32.mat is corrupt"):
        load("svhn", tmp_path, "test")


def test_imagefolder_needs_root_and_existing_split(tmp_path):
    with pytest.raises(CstarError, match="imagefolder needs root"):
        load("imagefolder")
    with pytest.raises(CstarError, match=f"{tmp_path}/train not found"):
        load("imagefolder", tmp_path)


# ---------------------------------------------------------------- batch loader

def test_eval_batches_are_the_images_in_order_scaled_to_unit_range():
    data = tiny_tensor_data(10)
    loader = make_loader(data, 4, train=False)
    assert isinstance(loader, BatchLoader) and len(loader) == 3  # eval keeps the last, partial batch
    batches = list(loader)
    x = torch.cat([b[0] for b in batches])
    assert x.dtype == torch.float32 and [len(b[0]) for b in batches] == [4, 4, 2]
    assert torch.equal(x, data.images.float() / 255)  # no augmentation in eval mode
    assert torch.equal(torch.cat([b[1] for b in batches]), data.labels)


def test_train_batches_shuffle_drop_last_and_stay_in_unit_range():
    data = tiny_tensor_data(10)
    loader = make_loader(data, 4, train=True)
    batches = list(loader)
    assert len(loader) == len(batches) == 2 and all(x.shape == (4, 3, 6, 5) for x, _ in batches)
    x, y = batches[0]
    assert 0 <= x.min() and x.max() <= 1 and y.dtype == torch.int64
    assert torch.cat([b[1] for b in batches]).tolist() != list(range(8))


def test_random_crop_equals_a_window_of_the_zero_padded_image():
    images = tiny_tensor_data(6).images
    out = random_crop(images, 2, torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    windows = []
    for image, crop in zip(padded, out):
        found = [(i, j) for i in range(5) for j in range(5)
                 if torch.equal(crop, image[:, i:i + 6, j:j + 5])]
        assert len(found) == 1
        windows.append(found[0])
    assert len(set(windows)) > 1


def test_random_flip_mirrors_about_half():
    images = tiny_tensor_data(64).images
    out = random_flip(images, torch.Generator().manual_seed(0))
    flipped = [torch.equal(o, torch.flip(i, [-1])) for o, i in zip(out, images)]
    assert all(f or torch.equal(o, i) for f, o, i in zip(flipped, out, images))
    assert 16 < sum(flipped) < 48


def test_train_augmentation_keeps_values_of_the_padded_image():
    data = tiny_tensor_data(8)  # cifar10 spec: crop_flip, padding 4
    (x, y), = list(make_loader(data, 8, train=True))
    padded = torch.nn.functional.pad(data.images, (4, 4, 4, 4))
    for crop, label in zip((x * 255).round().to(torch.uint8), y):
        source = padded[label]
        windows = [source[:, i:i + 6, j:j + 5] for i in range(9) for j in range(9)]
        assert any(torch.equal(crop, w) or torch.equal(crop, w.flip(-1)) for w in windows)


def test_augment_none_forces_augmentation_off_in_training():
    data = tiny_tensor_data(8)
    (x, y), = list(make_loader(data, 8, train=True, augment="none"))
    assert torch.equal(x, data.images[y].float() / 255)


def test_same_seed_and_epoch_repeat_and_a_new_epoch_differs():
    data = tiny_tensor_data(20)
    a, b = make_loader(data, 5, train=True, seed=3), make_loader(data, 5, train=True, seed=3)
    first = list(a)
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(first, b))
    a.set_epoch(1)
    assert torch.cat([y for _, y in a]).tolist() != torch.cat([y for _, y in first]).tolist()


def test_rank_shards_are_disjoint_equal_and_cover_the_set():
    data = tiny_tensor_data(12)
    shards = []
    for rank in range(3):
        loader = make_loader(data, 2, train=True, rank=rank, world_size=3, seed=7)
        loader.set_epoch(2)
        shards.append(torch.cat([y for _, y in loader]).tolist())
    assert [len(s) for s in shards] == [4, 4, 4]
    assert sorted(sum(shards, [])) == list(range(12))


def test_loader_rejects_bad_arguments():
    data = tiny_tensor_data(4)
    with pytest.raises(CstarError, match="batch_size"):
        make_loader(data, 0, train=True)
    with pytest.raises(CstarError, match="rank"):
        make_loader(data, 2, train=True, rank=2, world_size=2)
    with pytest.raises(CstarError, match="unknown augment 'flip'"):
        make_loader(data, 2, train=True, augment="flip")
    with pytest.raises(CstarError, match="no batch"):
        make_loader(data, 8, train=True)
