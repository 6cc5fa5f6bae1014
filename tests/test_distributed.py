"""Multi-process runs: 2 CPU processes (Gloo) started by torchrun give single-process results.

Each test starts ``python -m torch.distributed.run --standalone --nproc_per_node=2``
(torchrun with a free local port) in a subprocess. The training and evaluation
workers are this file itself run as a script (``python tests/test_distributed.py
WORKDIR``); the same functions, called in the pytest process, give the
single-process reference.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import cstar
from cstar import distributed
from cstar._core.errors import CstarError
from cstar.data import DATASETS, TensorData, make_loader

DATA = os.environ.get("CSTAR_TEST_DATA")
PER_RANK = 8  # per-rank batch; the single-process batch is 2 * PER_RANK over the same examples
METHODS = ("clean", "pgd", "trades")
EVAL_N = 101  # not a multiple of the world size


def torchrun(args: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    proc = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def tiny_data(n: int, seed: int) -> TensorData:
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 1, 8, 8), generator=gen, dtype=torch.uint8)
    labels = torch.randint(0, 10, (n,), generator=gen)
    return TensorData(images, labels, DATASETS["digits"])


def tiny_net() -> nn.Module:
    """Conv + linear, no BatchNorm (its batch statistics would differ between one batch of 2b and two of b)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))


def train_runs() -> dict:
    """Per method: the weights and logs after two 1-step ``fit`` calls on the same 2 * PER_RANK examples.

    The attacks' random starts are replaced by a fixed function of each pixel
    (TRADES needs a start off the clean input, where its loss is flat), so that
    one process with batch 2b and two with batch b (the loader's strided shards
    of the same shuffled order) see the same adversarial examples.
    """
    import cstar.attacks._gradient as gradient

    random_ball = gradient._random_ball
    gradient._random_ball = lambda x, radius, norm, generator: radius * torch.sin(50 * x + 1)
    try:
        return _train_runs()
    finally:
        gradient._random_ball = random_ball


def _train_runs() -> dict:
    world, data = distributed.world_size(), tiny_data(2 * PER_RANK, seed=1)
    val = tiny_data(11, seed=2)
    val = (val.images.float() / 255, val.labels)
    out = {}
    for method in METHODS:
        model = tiny_net()
        config = cstar.TrainConfig(attack=method, epochs=1, batch_size=PER_RANK * (2 // world), eps=0.1,
                                   attack_steps=3, schedule="constant", lr=0.5, weight_decay=0.0, check_size=11,
                                   check_steps=3, progress=False)
        loader = make_loader(data, config.batch_size, train=True, rank=distributed.rank(), world_size=world)
        assert len(loader) == 1
        logs = [cstar.fit(model, loader, config, val=val)[0] for _ in range(2)]  # twice: a fresh DDP each time
        out[method] = {"params": [p.detach().clone() for p in model.parameters()],
                       "logs": [{k: r[k] for k in ("train_loss", "train_adv_acc", "val_clean", "val_pgd")}
                                for r in logs]}
    return out


def eval_run(out_path: Path | None) -> dict:
    test_set = tiny_data(120, seed=3)
    return cstar.evaluate(tiny_net(), test_set, ["clean", "fgsm"], eps=0.05, n=EVAL_N, batch_size=16,
                          out_path=out_path, per_example=True)


def worker(workdir: Path) -> None:
    """One rank's share of the tests (run under torchrun)."""
    context = distributed.init_from_env("cpu")
    assert context.world_size == 2 and distributed.world_size() == 2
    assert distributed.init_from_env("cpu") == context  # idempotent
    assert distributed.all_reduce_sum([1, 2.5]) == [2, 5.0]
    assert distributed.broadcast_object(f"rank {context.rank}") == "rank 0"
    assert distributed.all_gather_object(f"rank {context.rank}") == ["rank 0", "rank 1"]
    r = context.rank
    torch.save(train_runs(), workdir / f"train-{r}.pt")
    result = eval_run(workdir / f"card-{r}.json")
    (workdir / f"eval-{r}.json").write_text(json.dumps(result))
    loader = make_loader(tiny_data(16, seed=1), 8, train=True, rank=r, world_size=2)
    try:
        cstar.fit(tiny_net(), loader, cstar.TrainConfig(attack="clean", epochs=1, sync_bn=True, progress=False))
    except CstarError as exc:
        (workdir / f"sync-bn-{r}.txt").write_text(str(exc))
    (workdir / f"diverged-{r}.txt").write_text(diverge_on_rank_1())
    torch.save(broadcasts_as_nccl_would(), workdir / f"broadcast-{r}.pt")
    distributed.shutdown()


class _NaNOnRank1(cstar.TrainHook):
    """A loss term that is NaN on rank 1 at its second step (a rank-local overflow), zero elsewhere."""

    def __init__(self):
        self.calls = 0

    def penalty(self, model):
        self.calls += 1
        bad = distributed.rank() == 1 and self.calls == 2
        return torch.tensor(float("nan") if bad else 0.0)


def diverge_on_rank_1() -> str:
    """What ``fit`` raises on this rank when rank 1's loss alone is not finite (it must not hang)."""
    loader = make_loader(tiny_data(48, seed=1), 8, train=True, rank=distributed.rank(), world_size=2)
    try:
        cstar.fit(tiny_net(), loader, cstar.TrainConfig(attack="clean", epochs=2, check_size=0, progress=False),
                  hooks=[_NaNOnRank1()])
    except CstarError as exc:
        return str(exc)
    return "no error"


def broadcasts_as_nccl_would() -> dict:
    """Broadcasts (a transposed view, ADMM's Z and U of a layer with more outputs than inputs) through a
    ``dist.broadcast`` that refuses non-contiguous tensors, as NCCL does (Gloo accepts them)."""
    import torch.distributed as dist

    real = dist.broadcast

    def strict(tensor, src, *args, **kwargs):
        if not tensor.is_contiguous():
            raise RuntimeError("Tensors must be contiguous")
        return real(tensor, src, *args, **kwargs)

    dist.broadcast = strict
    try:
        r = distributed.rank()
        view = torch.arange(12.0).view(3, 4).mul(r + 1).T  # rank 0: 0..11; rank 1: twice that
        distributed.broadcast_tensors([view])
        torch.manual_seed(r)  # different weights per rank: the broadcast must make Z and U agree
        model = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 32), nn.ReLU(),
                              nn.Linear(32, 10))
        plan = cstar.select_ranks(model, 1.5, exclude=["1"])
        admm = cstar.ADMM(model, plan, cstar.ADMMConfig(), steps_per_epoch=1)
        return {"view": view, "tall": [n for n in admm.names if model.get_submodule(n).out_features >
                                        model.get_submodule(n).in_features],
                "Z": admm.Z, "U": admm.U}
    finally:
        dist.broadcast = real


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("ddp")
    torchrun([str(Path(__file__).resolve()), str(workdir)], cwd=workdir)
    return workdir


def test_two_processes_take_the_same_steps_as_one_over_the_global_batch(two_ranks):
    single = train_runs()
    ranks = [torch.load(two_ranks / f"train-{r}.pt") for r in range(2)]
    for method in METHODS:
        for rank in ranks:
            for p_ddp, p_one in zip(rank[method]["params"], single[method]["params"]):
                torch.testing.assert_close(p_ddp, p_one, atol=1e-5, rtol=0, msg=method)
            for log_ddp, log_one in zip(rank[method]["logs"], single[method]["logs"]):
                assert log_ddp == pytest.approx(log_one, abs=1e-5), method
    assert single["clean"]["params"][0].ne(tiny_net()[0].weight).any()  # the steps did change the weights


def test_two_processes_evaluate_every_example_once(two_ranks, tmp_path):
    single = eval_run(tmp_path / "card.json")
    results = [json.loads((two_ranks / f"eval-{r}.json").read_text()) for r in range(2)]
    assert results[0]["accuracy"] == results[1]["accuracy"]
    for result in results:
        assert result["n_examples"] == EVAL_N
        assert result["accuracy"] == pytest.approx(single["accuracy"], abs=1e-12)
        assert result["per_example"] == single["per_example"]  # every example's result, in order
    assert (two_ranks / "card-0.json").exists() and not (two_ranks / "card-1.json").exists()


def test_sync_bn_on_cpu_processes_is_named(two_ranks):
    for r in range(2):
        message = (two_ranks / f"sync-bn-{r}.txt").read_text()
        assert "sync_bn" in message and "CUDA" in message


def test_a_non_finite_loss_on_one_rank_stops_every_rank_with_the_same_error(two_ranks):
    messages = [(two_ranks / f"diverged-{r}.txt").read_text() for r in range(2)]
    assert messages[0] == messages[1], messages
    assert "diverged at epoch 1, step 2" in messages[0]


def test_broadcasts_are_contiguous_as_nccl_requires(two_ranks):
    ranks = [torch.load(two_ranks / f"broadcast-{r}.pt") for r in range(2)]
    for result in ranks:
        torch.testing.assert_close(result["view"], torch.arange(12.0).view(3, 4).T, rtol=0, atol=0)
    assert ranks[0]["tall"], "the plan compresses no layer with more outputs than inputs"
    for key in ("Z", "U"):
        for name in ranks[0][key]:
            torch.testing.assert_close(ranks[1][key][name], ranks[0][key][name], rtol=0, atol=0)


@pytest.mark.skipif(not DATA, reason="CSTAR_TEST_DATA (a root holding MNIST/raw) is not set")
def test_compress_runs_under_torchrun_and_its_model_reloads(tmp_path):
    out = tmp_path / "run"
    section = "{epochs: 1, optimizer: adam, lr: 0.002, attack_steps: 2, batch_size: 32, check_size: 32}"
    proc = torchrun(["-m", "cstar", "compress", "--model", "small_cnn", "--data", "mnist", "--root", DATA,
                     "--ratio", "4", "--train-n", "256", "--val-size", "64", "--eval-n", "64",
                     "--eval-attacks", "clean,pgd2", "--dense", section, "--search", section,
                     "--admm", "{interval: 2, rho: 0.01}", "--finetune", section, "--device", "cpu",
                     "--no-progress", "--out", str(out)], cwd=tmp_path, timeout=300)
    assert proc.stdout.count("cstar compress:") == 1  # only rank 0 prints
    env = json.loads((out / "env.json").read_text())
    assert env["world_size"] == 2
    results = json.loads((out / "results.json").read_text())
    assert set(results["accuracy"]) == {"dense", "admm_projected", "final"}
    assert all(r["clean"] >= 0 for r in results["accuracy"].values())
    assert results["eval_subset"]["final"] == "first 64 examples"
    model = cstar.load(out / "model")
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    assert sum(p.numel() for p in model.parameters()) == results["params"]["compressed"]
    metrics = [json.loads(line) for line in (out / "search" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 1 and "admm_residual_mean" in metrics[0]


def test_only_rank_0_warns(tmp_path):
    # a step too short to cross the eps-ball is warned about on every CPU (--amp's note depends on the CPU)
    argv = ["-m", "cstar", "train", "--model", "small_cnn", "--data", "digits", "--epochs", "1", "--attack", "clean",
            "--val-size", "64", "--eval-attacks", "clean,pgd2", "--eval-step", "0.01", "--eval-n", "64",
            "--device", "cpu", "--no-progress"]
    alone = subprocess.run([sys.executable, *argv, "--out", str(tmp_path / "alone")], cwd=tmp_path,
                           capture_output=True, text=True, timeout=120)
    proc = torchrun([*argv, "--out", str(tmp_path / "run")], cwd=tmp_path)
    warning = "less than eps 0.2, so its accuracy overstates robustness"
    assert alone.returncode == 0 and alone.stderr.count(warning) >= 1
    assert proc.stderr.count(warning) == alone.stderr.count(warning)


def test_without_torchrun_every_helper_is_a_single_process_no_op(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    context = distributed.init_from_env("cpu")
    assert (context.rank, context.world_size, context.distributed) == (0, 1, False)
    assert distributed.is_main() and distributed.world_size() == 1
    assert distributed.all_reduce_sum(3) == 3 and distributed.any_rank(False) is False
    model = tiny_net()
    assert distributed.wrap(model) is model and distributed.unwrap(model) is model
    distributed.barrier()
    distributed.shutdown()


def test_a_world_size_without_the_rest_of_torchruns_settings_is_named(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(CstarError, match="torchrun"):
        distributed.init_from_env("cpu")


if __name__ == "__main__":
    torch.set_num_threads(1)
    worker(Path(sys.argv[1]))
