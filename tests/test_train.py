"""The training loop on one process: an interrupted run resumes to exactly the uninterrupted weights
(dropout, optimiser and scheduler included), a NaN loss stops with a message naming the checkpoint and
leaves the last good one untouched, the CSV log averages each logging window, and a finished run is
not retrained; on a GPU, steps and predictions of compiled CUDA graphs run back to back."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from vqhps.config import RuntimeConfig
from vqhps.train import TrainingDiverged, device_step_indices, rank_slice, read_log, step_indices, train

N, BATCH, SEED = 32, 8, 3
X = torch.randn(N, 4, generator=torch.Generator().manual_seed(0))
Y = X @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]]) + 0.1


def _runtime(log_every: int = 2, ckpt_every: int = 3) -> RuntimeConfig:
    return RuntimeConfig(device="cpu", amp=False, compile=False, channels_last=False, log_every=log_every,
                         ckpt_every=ckpt_every, progress=False)


def _setup(init_seed: int = 0):
    """A small MLP with dropout (the RNG must resume too), Adam and a step schedule."""
    torch.manual_seed(init_seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(16, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    return model, optimizer, scheduler


def batch_fn(step: int) -> dict:
    idx = torch.as_tensor(rank_slice(step_indices(N, BATCH, step, SEED)))
    return {"x": X[idx], "y": Y[idx]}


def loss_fn(model, batch, step):
    loss = torch.nn.functional.mse_loss(model(batch["x"]), batch["y"])
    return {"loss": loss, "step_seen": torch.tensor(float(step))}


def _run(out_dir, total=7, stop_after=None, init_seed=0, runtime=None, loss=loss_fn, batches=batch_fn, seed=SEED):
    model, optimizer, scheduler = _setup(init_seed)
    result = train("mlp", model, optimizer, scheduler, batches, loss, total, out_dir, runtime or _runtime(),
                   stop_after=stop_after, seed=seed)
    return model, result


def test_resumed_run_matches_uninterrupted(tmp_path):
    full, full_res = _run(tmp_path / "a")
    _, part = _run(tmp_path / "b", stop_after=4)
    assert part.history[-1]["step"] == 4 and part.resumed_from == 0
    # a different initialisation proves the weights come from the checkpoint
    resumed, res = _run(tmp_path / "b", init_seed=99)
    assert res.resumed_from == 4
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert [r["loss"] for r in res.history] == [r["loss"] for r in full_res.history]
    assert [r["step"] for r in res.history] == [2, 3, 4, 6, 7]
    assert res.history[-1]["lr"] == pytest.approx(1e-2 * 0.5 ** 3)  # the schedule resumed as well


def test_dropout_stream_depends_on_the_seed(tmp_path):
    a, _ = _run(tmp_path / "a", total=2)
    b, _ = _run(tmp_path / "b", total=2, seed=SEED + 1)
    assert not torch.equal(a[0].weight, b[0].weight)


def test_csv_log_averages_each_window_up_to_the_last_step(tmp_path):
    _, res = _run(tmp_path)
    rows = read_log(res.log)
    # rows at every 2nd step, every checkpoint (3, 6) and the last step; each averages the steps since the last row
    assert [r["step"] for r in rows] == [2, 3, 4, 6, 7]
    assert [r["step_seen"] for r in rows] == [0.5, 2.0, 3.0, 4.5, 6.0]
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in res.history])
    assert list(rows[0])[:2] == ["loss", "step_seen"] and {"lr", "wall_s"} <= set(rows[0])


def test_nan_loss_raises_and_keeps_the_last_good_checkpoint(tmp_path):
    _, res = _run(tmp_path, stop_after=3)
    good = res.checkpoint.read_bytes()
    good_log = res.log.read_text()

    def poisoned(model, batch, step):
        out = loss_fn(model, batch, step)
        if step >= 4:
            out["loss"] = out["loss"] * float("nan")
        return out

    with pytest.raises(TrainingDiverged, match=re.escape(str(res.checkpoint))) as err:
        _run(tmp_path, loss=poisoned)
    assert "step 3" in str(err.value) and "loss" in str(err.value)
    assert res.checkpoint.read_bytes() == good  # step 6 was a checkpoint step: nothing was written
    assert res.log.read_text() == good_log
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_nan_before_any_checkpoint_says_so(tmp_path):
    def nan_loss(model, batch, step):
        out = loss_fn(model, batch, step)
        out["loss"] = out["loss"] * float("nan")
        return out

    with pytest.raises(TrainingDiverged, match="no checkpoint was written yet"):
        _run(tmp_path, loss=nan_loss)
    assert not (tmp_path / "mlp.pt").exists()


def test_completed_run_returns_immediately(tmp_path):
    trained, first = _run(tmp_path)
    before = first.checkpoint.read_bytes()

    def no_batches(step):
        raise AssertionError("a finished run must not train again")

    again, res = _run(tmp_path, init_seed=5, batches=no_batches)
    assert res.resumed_from == 7 and res.wall_s == 0.0
    assert res.total_wall_s == pytest.approx(first.total_wall_s)
    assert res.history == first.history
    assert torch.equal(again[0].weight, trained[0].weight)
    assert first.checkpoint.read_bytes() == before


def test_step_indices_cover_each_epoch_once():
    seen = np.concatenate([step_indices(N, BATCH, s, SEED) for s in range(N // BATCH)])
    assert sorted(seen.tolist()) == list(range(N))
    assert not np.array_equal(step_indices(N, BATCH, 0, SEED), step_indices(N, BATCH, N // BATCH, SEED))


def test_device_step_indices_give_the_host_batches_in_any_step_order():
    indices = device_step_indices(N, BATCH, SEED, "cpu")
    per_epoch = N // BATCH
    # forwards over three epochs, then back to earlier epochs as a resumed run would
    for step in [*range(3 * per_epoch), 0, per_epoch + 1, 5]:
        expected = torch.as_tensor(rank_slice(step_indices(N, BATCH, step, SEED)))
        assert torch.equal(indices(step), expected), step


class _TwoCompiledBranches(torch.nn.Module):
    """Two separately compiled submodules in one forward, as VQ-HPS's two backbones."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
        self.b = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))

    def forward(self, x):
        return self.a(x) + self.b(x)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs exist only on a GPU")
def test_cuda_graph_training_steps_and_predictions_run_back_to_back():
    from vqhps.train import new_iteration, train_step

    torch.manual_seed(0)
    model = _TwoCompiledBranches().cuda()
    for branch in (model.a, model.b):
        branch.compile(mode="reduce-overhead")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    batch = {"x": X[:BATCH].cuda(), "y": Y[:BATCH].cuda()}
    losses = [float(train_step(model, model, optimizer, None, batch, loss_fn, s, amp=True)["loss"]) for s in range(6)]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    model.eval()
    with torch.no_grad():
        outputs = []
        for _ in range(3):  # prediction batches, each a new iteration of the graphs
            new_iteration()
            outputs.append(model(batch["x"]).clone())
        assert all(torch.equal(outputs[0], o) for o in outputs[1:])


def _graph_setup():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1)).cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    return model, optimizer, scheduler


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs exist only on a GPU")
def test_cuda_graph_step_trains_to_the_eager_weights_and_follows_the_schedule():
    from vqhps.train import GraphedTrainStep, replays_graph, train_step

    steps = 9  # 3 eager warm-up steps, the captured one, 5 replays; the lr halves every 2 steps
    eager, opt_e, sched_e = _graph_setup()
    for s in range(steps):
        b = {k: v.cuda() for k, v in batch_fn(s).items()}
        train_step(eager, eager, opt_e, sched_e, b, loss_fn, s, amp=False)
    graphed, opt_g, sched_g = _graph_setup()
    step = GraphedTrainStep(graphed, graphed, opt_g, sched_g, loss_fn, amp=False)
    for s in range(steps):
        losses = step({k: v.cuda() for k, v in batch_fn(s).items()}, s)
    assert step.graph is not None and step.failed is None and replays_graph(step)
    assert opt_g.param_groups[0]["lr"] == pytest.approx(opt_e.param_groups[0]["lr"]) == 1e-2 * 0.5 ** 4
    for a, b in zip(eager.parameters(), graphed.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(losses["loss"]) and "grad_norm" in losses


def test_settings_a_captured_step_holds_fixed_are_the_ones_a_one_cycle_schedule_moves():
    from vqhps.train import changed_optimizer_settings, optimizer_settings

    model = torch.nn.Linear(4, 1)
    adam = torch.optim.Adam(model.parameters(), lr=1e-2)
    one_cycle = torch.optim.lr_scheduler.OneCycleLR(adam, max_lr=1e-2, total_steps=10)
    before = optimizer_settings(adam)
    adam.step()
    one_cycle.step()
    assert changed_optimizer_settings(before, adam) == ["group 0: betas"]  # momentum cycles with the rate

    adamw = torch.optim.AdamW(model.parameters(), lr=1e-2)
    step_lr = torch.optim.lr_scheduler.StepLR(adamw, step_size=1, gamma=0.5)
    before = optimizer_settings(adamw)
    for _ in range(3):
        adamw.step()
        step_lr.step()
    assert adamw.param_groups[0]["lr"] == pytest.approx(1.25e-3)  # the learning rate reaches the graph as a tensor
    assert changed_optimizer_settings(before, adamw) == []
    adamw.param_groups[0]["weight_decay"] = 0.5
    assert changed_optimizer_settings(before, adamw) == ["group 0: weight_decay"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs exist only on a GPU")
def test_cuda_graph_step_whose_momentum_cycles_falls_back_to_the_eager_weights():
    from vqhps.train import GraphedTrainStep, replays_graph, train_step

    def setup():
        model, optimizer, _ = _graph_setup()
        return model, optimizer, torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-2, total_steps=10)

    eager, opt_e, sched_e = setup()
    for s in range(8):
        train_step(eager, eager, opt_e, sched_e, {k: v.cuda() for k, v in batch_fn(s).items()}, loss_fn, s, amp=False)
    graphed, opt_g, sched_g = setup()
    step = GraphedTrainStep(graphed, graphed, opt_g, sched_g, loss_fn, amp=False)
    with pytest.warns(UserWarning, match="betas"):
        for s in range(8):
            step({k: v.cuda() for k, v in batch_fn(s).items()}, s)
    assert "betas" in step.failed and not replays_graph(step)
    for a, b in zip(eager.parameters(), graphed.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs exist only on a GPU")
def test_cuda_graph_step_that_reads_the_gpu_falls_back_to_eager_steps():
    from vqhps.train import GraphedTrainStep, replays_graph

    def syncing_loss(model, batch, step):
        out = loss_fn(model, batch, step)
        if out["loss"].item() < 0:  # a host read: cannot be captured
            raise AssertionError("unreachable")
        return out

    model, opt, sched = _graph_setup()
    step = GraphedTrainStep(model, model, opt, sched, syncing_loss, amp=False)
    with pytest.warns(UserWarning, match="not captured in a CUDA graph"):
        losses = [float(step({k: v.cuda() for k, v in batch_fn(s).items()}, s)["loss"]) for s in range(8)]
    assert step.failed and step.graph is None and not replays_graph(step) and losses[-1] < losses[0]


@pytest.mark.parametrize("deterministic", [False, True])
def test_deterministic_runtime_holds_during_the_loop_only(tmp_path, deterministic):
    seen = []

    def recording_loss(model, batch, step):
        seen.append(torch.are_deterministic_algorithms_enabled())
        return loss_fn(model, batch, step)

    runtime = _runtime()
    runtime.deterministic = deterministic
    before = torch.are_deterministic_algorithms_enabled()
    _run(tmp_path, total=3, runtime=runtime, loss=recording_loss)
    assert seen == [deterministic] * 3
    assert torch.are_deterministic_algorithms_enabled() is before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="atomic scatter-adds exist only on a GPU")
def test_deterministic_mesh_convolution_training_repeats_bit_for_bit(tmp_path):
    """The mesh convolution's backward adds into shared vertices (index_add_): atomically on a GPU, in
    a varying order, unless runtime.deterministic; then two runs of one seed end on the same weights."""
    from vqhps.mesh.conv import MeshConv

    n, k = 2000, 9
    index = torch.randint(0, n, (n, k), generator=torch.Generator().manual_seed(0))
    x = torch.randn(16, n, 8, generator=torch.Generator().manual_seed(1)).cuda()

    def run(out_dir):
        torch.manual_seed(0)
        model = torch.nn.Sequential(MeshConv(index, torch.ones(n, k, dtype=torch.bool), 8, 16),
                                    MeshConv(index, torch.ones(n, k, dtype=torch.bool), 16, 3)).cuda()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        runtime = _runtime()
        runtime.device, runtime.deterministic = "cuda", True
        train("conv", model, optimizer, None, lambda s: {"x": x}, lambda m, b, s: {"loss": m(b["x"]).square().mean()},
              20, out_dir, runtime, seed=SEED)
        return [p.detach().clone() for p in model.parameters()]

    for a, b in zip(run(tmp_path / "a"), run(tmp_path / "b")):
        assert torch.equal(a, b)
