"""torch.distributed training (design §13): 2 gloo ranks × B samples give one process's step on the
2B batch, for every method; the distributed sampler; the gradient-carrying all-gather; a 2-rank
run killed mid-epoch resumes to the bit."""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from bgf_pyg import cli, distributed
from bgf_pyg.checks import InputError
from bgf_pyg.data import ClassBalancedBatchSampler, DistributedClassBalancedBatchSampler
from bgf_pyg.experiment import build
from bgf_pyg.models import build_method, build_optimizer
from bgf_pyg.models.backbones import EmbeddingNet
from bgf_pyg.train import (
    LAST_CHECKPOINT,
    RESUME_KEYS,
    Checkpointer,
    Evaluator,
    Precision,
    TrainingState,
    evaluate,
    fit,
    load_checkpoint,
    read_metrics,
    save_checkpoint,
    seed_all,
    train_one_epoch,
)

from .dist_helpers import free_port, kill_process_tree, spawn

WORLD = 2
#: Global batch: WORLD·P classes × M samples; rank r holds the r-th block of P·M rows, as the
#: distributed sampler hands them out.
P, M, NUM_CLASSES, SIDE = 2, 3, 6, 4
#: Method name, build_method keyword arguments (small graphs; the intra-batch MPN keeps its
#: dropout 0.1, which the ranks must draw identically on the global batch).
CASES = {
    "plain": ("plain", {}),
    "plain-proxy_anchor": ("plain", {"loss": "proxy_anchor"}),
    "bgformer": ("bgformer", {"k": 3, "num_layers": 1, "heads": 2}),
    "intra-batch": ("intra-batch", {"heads": 2}),
    "proxygml": ("proxygml", {"proxies_per_class": 2, "r": 0.5}),
}
LR, PROXY_LR = 0.5, 5.0


def make_case(case: str):
    """Freshly seeded float64 method (a BN-free tiny backbone: per-rank BatchNorm statistics are
    the one thing DDP does not share) and the global batch."""
    torch.manual_seed(0)
    name, kwargs = CASES[case]
    trunk = nn.Sequential(nn.Flatten(), nn.Linear(SIDE * SIDE, 32), nn.Tanh())
    method = build_method(name, EmbeddingNet(trunk, 32, 8), NUM_CLASSES, **kwargs).double()
    images = torch.randn(WORLD * P * M, 1, SIDE, SIDE, dtype=torch.float64)
    labels = torch.randperm(NUM_CLASSES)[: WORLD * P].repeat_interleave(M)
    return method, images, labels


def one_step(method, images, labels):
    """One SGD step (SGD, not Adam: Adam would hide a wrong gradient scale) through the real
    training loop; loss, gradients and parameters after the step."""
    model = distributed.wrap_ddp(method, torch.device("cpu"))
    optimizer = torch.optim.SGD(method.param_groups(LR, PROXY_LR))
    torch.manual_seed(1)  # the same dropout draws in every process
    loss = train_one_epoch(model, [(images, labels)], optimizer, Precision(torch.device("cpu")))
    grads = {n: p.grad.clone() for n, p in method.named_parameters() if p.requires_grad}
    return loss, grads, {k: v.clone() for k, v in method.state_dict().items()}


def _step_worker(rank: int, path: str) -> None:
    distributed.init_distributed("cpu", timeout_s=30)
    results = {}
    rows = P * M
    for case in CASES:
        method, images, labels = make_case(case)
        part = slice(rank * rows, (rank + 1) * rows)
        results[case] = one_step(method, images[part], labels[part])
    if rank == 0:
        torch.save(results, path)
    distributed.destroy_distributed()


def test_two_ranks_step_equals_one_process_on_the_joint_batch(tmp_path):
    path = tmp_path / "ranks.pt"
    spawn(_step_worker, WORLD, str(path))
    ranks = torch.load(path, weights_only=True)
    for case in CASES:
        loss, grads, state = one_step(*make_case(case))
        assert all(g.abs().sum() > 0 for g in grads.values()), case  # every parameter trains
        rank_loss, rank_grads, rank_state = ranks[case]
        assert rank_loss == pytest.approx(loss, rel=1e-12), case
        for name in grads:
            torch.testing.assert_close(rank_grads[name], grads[name], rtol=1e-9, atol=1e-12,
                                       msg=f"{case}: gradient of {name}")
        for name in state:
            torch.testing.assert_close(rank_state[name], state[name], rtol=1e-9, atol=1e-12,
                                       msg=f"{case}: {name} after the step")


def _gather_worker(rank: int, path: str) -> None:
    distributed.init_distributed("cpu", timeout_s=30)
    x = torch.arange(6.0, dtype=torch.float64).view(3, 2).add(10 * rank).requires_grad_()
    gathered = distributed.all_gather_with_grad(x)
    weight = torch.arange(12.0, dtype=torch.float64).view(6, 2)
    (gathered * weight).sum().backward()
    rows = torch.tensor(list(distributed.shard(range(10, 15))))  # uneven shards: 2 and 3 rows
    shards = distributed.all_gather_tensor(rows)
    if rank == 1:
        torch.save({"gathered": gathered.detach(), "grad": x.grad, "shards": shards}, path)
    distributed.destroy_distributed()


def test_all_gather_rows_summed_gradient_slice_and_shards(tmp_path):
    spawn(_gather_worker, WORLD, str(tmp_path / "g.pt"))
    out = torch.load(tmp_path / "g.pt", weights_only=True)
    ranks = [torch.arange(6.0, dtype=torch.float64).view(3, 2) + 10 * r for r in range(WORLD)]
    torch.testing.assert_close(out["gathered"], torch.cat(ranks))
    # Each of the 2 ranks computes the same loss: rank 1's rows get 2 × their weight.
    weight = torch.arange(12.0, dtype=torch.float64).view(6, 2)
    torch.testing.assert_close(out["grad"], WORLD * weight[3:])
    assert out["shards"].tolist() == list(range(10, 15))  # the shards rebuild the dataset


def test_single_process_helpers_are_the_identity():
    x, y = torch.randn(4, 3, requires_grad=True), torch.arange(4)
    assert distributed.gather_batch(x, y) == (x, y)
    assert distributed.all_gather_tensor(x) is x
    assert distributed.get_world_size() == 1 and distributed.is_main_process()
    assert distributed.run_on_main(lambda: 7) == 7
    module = nn.Linear(2, 2)
    assert distributed.wrap_ddp(module, torch.device("cpu")) is module


def test_distributed_sampler_splits_the_global_batch():
    labels = torch.arange(7).repeat_interleave(5)
    world, p, m = 3, 2, 4
    ranks = [DistributedClassBalancedBatchSampler(labels, p, m, num_batches=4, seed=3, rank=r,
                                                  world_size=world) for r in range(world)]
    single = ClassBalancedBatchSampler(labels, world * p, m, num_batches=4, seed=3)
    for epoch in (0, 1):
        for sampler in (*ranks, single):
            sampler.set_epoch(epoch)
        per_rank = [list(s) for s in ranks]
        assert {len(batches) for batches in per_rank} == {4}  # the same steps on every rank
        for step, joint in enumerate(single):
            batches = [batches[step] for batches in per_rank]
            assert sum(batches, []) == joint  # rank order rebuilds the single-process batch
            classes = [set(labels[b].tolist()) for b in batches]
            assert all(len(c) == p for c in classes)
            assert len(set().union(*classes)) == world * p  # disjoint across ranks
    resumed = ranks[1]
    resumed.set_epoch(1, start_batch=3)
    assert list(resumed) == per_rank[1][3:] and len(resumed) == 1


def test_distributed_sampler_refuses_too_many_classes_for_the_world():
    labels = torch.arange(5).repeat_interleave(4)
    with pytest.raises(ValueError, match=r"2 × 3 = 6 exceeds the 5 training classes"):
        DistributedClassBalancedBatchSampler(labels, 2, 2, rank=0, world_size=3)
    with pytest.raises(ValueError, match="rank must lie in"):
        DistributedClassBalancedBatchSampler(labels, 1, 2, rank=2, world_size=2)
    with pytest.raises(ValueError, match="start_batch"):
        ClassBalancedBatchSampler(labels, 2, 2, num_batches=3).set_epoch(0, start_batch=4)


# ------------------------------------------------------------------ kill mid-epoch, then resume


class NoisyImages(torch.utils.data.Dataset):
    """Tiny images + labels whose noise comes from NumPy's global RNG, which each rank seeds
    differently: a resumed run matches only if every rank gets its own RNG state back. Raises
    ``KeyboardInterrupt`` (a kill) on its ``die_after``-th item."""

    def __init__(self, die_after: int | None = None) -> None:
        generator = torch.Generator().manual_seed(5)
        self.images = torch.randn(40, 1, SIDE, SIDE, generator=generator)
        self.labels = torch.arange(NUM_CLASSES - 1).repeat_interleave(8)
        self.num_classes = NUM_CLASSES - 1
        self.die_after, self.served = die_after, 0

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        self.served += 1
        if self.served == self.die_after:
            raise KeyboardInterrupt
        noise = torch.from_numpy(np.random.standard_normal((1, SIDE, SIDE))).float()
        return self.images[index] + 0.1 * noise, self.labels[index]


def _fit_worker(rank: int, method_name: str, out: str, resume: bool, die_after,
                checkpoint_every) -> None:
    distributed.init_distributed("cpu", timeout_s=30)
    generator = seed_all(0)
    generator.manual_seed(rank)
    if resume:  # a new process: nothing of the killed run's RNG state survives
        torch.manual_seed(99)
    np.random.seed(10 + rank)
    args = argparse.Namespace(method=method_name, num_workers=0, batch_size=4,
                              classes_per_batch=2, samples_per_class=2, seed=0)
    dataset = NoisyImages(die_after)
    loader = build.train_loader(args, dataset, generator)
    trunk = nn.Sequential(nn.Flatten(), nn.Linear(SIDE * SIDE, 16), nn.Tanh())
    method = build_method(method_name, EmbeddingNet(trunk, 16, 8), dataset.num_classes,
                          **CASES[method_name][1])
    optimizer = build_optimizer(method, 1e-2, 1e-1)
    test = torch.utils.data.DataLoader(distributed.shard(NoisyImages()), batch_size=8)
    try:
        fit(TrainingState(method, optimizer, loader), Checkpointer(out, every=checkpoint_every),
            epochs=3, evaluator=Evaluator(method, torch.device("cpu"), loader=test),
            resume=resume, progress=False)
    except KeyboardInterrupt:
        return  # killed: what is on disk is what a SIGKILL would leave (atomic checkpoints)
    finally:
        distributed.destroy_distributed()
    if rank == 0:
        torch.save(method.state_dict(), Path(out) / "final.pt")


@pytest.mark.parametrize("method_name,checkpoint_every", [("intra-batch", 2), ("proxygml", None)])
def test_killed_mid_epoch_and_resumed_equals_uninterrupted(tmp_path, method_name,
                                                           checkpoint_every):
    straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
    spawn(_fit_worker, WORLD, method_name, straight, False, None, checkpoint_every)
    per_epoch = len(NoisyImages()) // WORLD  # items each rank loads per epoch (5 steps × 4)
    die_after = per_epoch * 3 // 2  # in the 3rd step of epoch 2
    spawn(_fit_worker, WORLD, method_name, killed, False, die_after, checkpoint_every)
    state = load_checkpoint(Path(killed) / LAST_CHECKPOINT)
    # with checkpoint_every=2 the run resumes after step 2 of epoch 2 (sampler position), else
    # from the end of epoch 1
    assert (state["epoch"], state["step"]) == ((1, 2) if checkpoint_every else (1, 0))
    assert len(state["rng"]) == WORLD
    spawn(_fit_worker, WORLD, method_name, killed, True, None, checkpoint_every)
    a = torch.load(Path(straight) / "final.pt", weights_only=True)
    b = torch.load(Path(killed) / "final.pt", weights_only=True)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=0, msg=name)
    assert read_metrics(straight) == read_metrics(killed)
    assert [r["epoch"] for r in read_metrics(straight)] == [1, 2, 3, 3]  # and the final test


def test_resume_with_another_world_size_is_refused(tmp_path):
    save_checkpoint(tmp_path / LAST_CHECKPOINT, {"world_size": 2,
                                                 **dict.fromkeys(RESUME_KEYS)})
    method = build_method("plain", EmbeddingNet(nn.Flatten(), SIDE * SIDE, 8))
    with pytest.raises(InputError, match="written by a run of 2 process"):
        fit(TrainingState(method, build_optimizer(method, 1e-3, 1e-3), []), Checkpointer(tmp_path),
            epochs=1, resume=True)


# ------------------------------------------------------------------ bad input: every rank, no hang

#: Each case: (argv of rank 0, argv of rank 1, what the error names). The demo leaves 40 training
#: classes.
BAD_LAUNCHES = {
    "world too big for P×M": ([], [], ["--classes-per-batch", "21"],
                              "21 × 2 = 42 exceeds the 40 training classes"),
    "k over the global batch": ([], [], ["--classes-per-batch", "2", "--samples-per-class", "9",
                                         "--k", "40"],
                                "--k 40 must be smaller than the global batch of 36"),
    "different options": (["--seed", "0"], ["--seed", "1"], [], "seed: rank 0=0, rank 1=1"),
}


def _cli_worker(rank: int, out: str, ports: list[int]) -> None:
    for (case, (rank0, rank1, common, _)), port in zip(BAD_LAUNCHES.items(), ports, strict=True):
        os.environ["MASTER_PORT"] = str(port)  # a fresh rendezvous for every launch
        argv = ["--epochs", "1", "--no-progress", "--out", str(Path(out, case)),
                "--dist-timeout", "20",
                *common, *(rank0 if rank == 0 else rank1)]
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr):
            code = cli.main(argv)
        Path(out, f"{case}.{rank}").write_text(f"{code}\n{stderr.getvalue()}")


def test_bad_launches_fail_on_every_rank_without_hanging(tmp_path):
    spawn(_cli_worker, WORLD, str(tmp_path), [free_port() for _ in BAD_LAUNCHES])
    for case, (*_, fragment) in BAD_LAUNCHES.items():
        for rank in range(WORLD):
            code, err = (tmp_path / f"{case}.{rank}").read_text().split("\n", 1)
            assert code == "2", (case, rank, err)
            assert "Traceback" not in err
            assert err.strip().splitlines()[-1].startswith(f"bgf-train: error: [rank {rank}] ")
            assert fragment in err, (case, rank, err)


# ---------------------------------------------------- the real thing: torchrun, SIGKILL

TORCHRUN_ARGS = ["--method", "plain", "--epochs", "3", "--embedding-dim", "16",
                 "--classes-per-batch", "4", "--samples-per-class", "12", "--eval-every", "3",
                 "--no-progress", "--checkpoint-every", "5",
                 "--select-on", "last"]  # 12 steps an epoch: 2 ranks × 4 × 12 of 1,200 images


def _torchrun(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={WORLD}",
            f"--master_port={free_port()}", "-m", "bgf_pyg.cli", *TORCHRUN_ARGS, "--out",
            str(out), *extra]


@pytest.mark.slow  # 3 torchrun launches of the demo (~2 min on 2 cores): .ci/run runs it
def test_torchrun_sigkill_mid_epoch_then_resume_is_bit_identical(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(_torchrun(straight), check=True, timeout=600, capture_output=True)
    run = subprocess.Popen(_torchrun(killed),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        end = time.monotonic() + 300
        while not (killed / LAST_CHECKPOINT).is_file() and time.monotonic() < end:
            time.sleep(0.05)
        kill_process_tree(run.pid)  # torchrun and both ranks, mid-epoch
    finally:
        run.wait(timeout=60)
    state = load_checkpoint(killed / LAST_CHECKPOINT)
    assert state["epoch"] < 3 and state["step"] > 0  # a mid-epoch checkpoint (every 5 steps)
    subprocess.run(_torchrun(killed, "--resume"), check=True, timeout=600, capture_output=True)
    a = load_checkpoint(straight / LAST_CHECKPOINT)
    b = load_checkpoint(killed / LAST_CHECKPOINT)
    for name in a["model"]:
        torch.testing.assert_close(b["model"][name], a["model"][name], rtol=0, atol=0, msg=name)
    assert read_metrics(straight) == read_metrics(killed)


def _failing_rank_worker(rank: int, path: str) -> None:
    distributed.init_distributed("cpu", timeout_s=5)
    outcome = "returned"
    try:
        if rank == 0:  # rank 0 fails inside run_on_main: the other rank must not wait forever
            distributed.run_on_main(lambda: 1 / 0)
        else:
            distributed.run_on_main(lambda: "never runs here")
    except ZeroDivisionError:
        outcome = "ZeroDivisionError"
    except InputError as err:
        outcome = f"InputError: {err}"
    Path(path, f"rank{rank}").write_text(outcome)
    distributed.destroy_distributed()


def test_an_error_on_rank_0_reaches_every_rank(tmp_path):
    spawn(_failing_rank_worker, WORLD, str(tmp_path), deadline_s=30)
    assert (tmp_path / "rank0").read_text() == "ZeroDivisionError"
    assert (tmp_path / "rank1").read_text() == "InputError: rank 0 failed: ZeroDivisionError: " \
                                               "division by zero"


def test_mid_epoch_checkpoints_need_a_class_balanced_sampler(tmp_path):
    method = build_method("proxygml", EmbeddingNet(nn.Flatten(), SIDE * SIDE, 8), 5)
    loader = torch.utils.data.DataLoader(NoisyImages(), batch_size=4, shuffle=True)
    with pytest.raises(ValueError, match="checkpoint_every needs a class-balanced"):
        fit(TrainingState(method, build_optimizer(method, 1e-3, 1e-3), loader),
            Checkpointer(tmp_path, every=2), epochs=1)


def _clean_images() -> torch.utils.data.TensorDataset:
    data = NoisyImages()
    return torch.utils.data.TensorDataset(data.images, data.labels)


def _bn_method():
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Flatten(), nn.Linear(SIDE * SIDE, 16), nn.BatchNorm1d(16), nn.Tanh())
    return build_method("plain", EmbeddingNet(trunk, 16, 8))


def _eval_worker(rank: int, path: str) -> None:
    distributed.init_distributed("cpu", timeout_s=30)
    method = _bn_method()
    model = distributed.wrap_ddp(method, torch.device("cpu"))
    images, labels = make_case("plain")[1:]
    images = images.float()
    rows = P * M
    part = slice(rank * rows, (rank + 1) * rows)  # different data: different BN statistics
    train_one_epoch(model, [(images[part], labels[part])], torch.optim.SGD(method.parameters(),
                    lr=0.1), Precision(torch.device("cpu")))
    test = torch.utils.data.DataLoader(distributed.shard(_clean_images()), batch_size=8)
    metrics = evaluate(method, test, torch.device("cpu"))
    if rank == 0:
        torch.save({"metrics": metrics, "state": method.state_dict()}, path)
    distributed.destroy_distributed()


def test_distributed_evaluation_equals_evaluating_the_checkpoint(tmp_path):
    spawn(_eval_worker, WORLD, str(tmp_path / "eval.pt"))
    out = torch.load(tmp_path / "eval.pt", weights_only=True)
    method = _bn_method()
    method.load_state_dict(out["state"])  # rank 0's weights and BN statistics: the checkpoint
    test = torch.utils.data.DataLoader(_clean_images(), batch_size=8)
    assert out["metrics"] == pytest.approx(evaluate(method, test, torch.device("cpu")))
