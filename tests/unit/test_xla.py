"""torch_xla strategy. Without torch_xla (CI): options, the clear unavailability error, and the control
flow of the device loader and optimizer against stand-ins. With torch_xla (`nox -s xla`: torch 2.9 +
torch_xla 2.9 on PJRT_DEVICE=CPU, one device): the real loop, collectives and checkpoints, marked `xla`."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest
import torch

from distrib import Settings, XLAOptions, accumulate, distributed, prepare
from distrib._environment import launcher_settings
from distrib.errors import CheckpointMismatchError, SettingsError
from distrib.strategies import xla
from distrib.strategies._xla_loader import XLADeviceLoader
from tests._support.checkpoints import load_direct, save_direct
from tests._support.models import make_loader, make_model, max_difference, run_loop

HAS_TORCH_XLA = importlib.util.find_spec("torch_xla") is not None
needs_torch_xla = pytest.mark.skipif(
    not HAS_TORCH_XLA,
    reason="needs torch_xla (torch 2.9 + torch_xla 2.9); run `nox -s xla`, which builds that environment",
)


def test_options_from_code_dicts_and_the_launcher():
    assert Settings.from_mapping({"xla": {"sync_every_step": False}}).xla == XLAOptions(sync_every_step=False)
    assert launcher_settings({"DISTRIB_XLA": '{"loader_prefetch_size": 2}'})["xla"].loader_prefetch_size == 2
    with pytest.raises(SettingsError, match="device_prefetch_size=0 must be >= 1"):
        XLAOptions(device_prefetch_size=0)
    with pytest.raises(SettingsError, match="unknown setting 'mark_step' for XLAOptions"):
        Settings.from_mapping({"xla": {"mark_step": True}})


@pytest.mark.skipif(HAS_TORCH_XLA, reason="checks the error shown where torch_xla is missing")
def test_without_torch_xla_the_strategy_says_how_to_get_it():
    assert xla.is_available() is False
    reason = xla.unavailable_reason()
    assert "pip install 'distrib[xla]'" in reason and "match torch's version" in reason
    with (
        pytest.raises(SettingsError, match=r"strategy 'xla' cannot run here.*distrib\[xla\]"),
        distributed(strategy="xla"),
    ):
        pass


def test_device_loader_reports_the_position_the_loop_sees(monkeypatch: pytest.MonkeyPatch):
    """MpDeviceLoader reads ahead on a thread; accumulate must still see the loop's position."""

    def read_everything_first(self: XLADeviceLoader) -> Any:
        return iter(list(self.loader))  # the wrapped loader is exhausted before the first batch

    monkeypatch.setattr(XLADeviceLoader, "_device_loader", read_everything_first)
    with distributed(gradient_accumulation_steps=3) as ctx:
        loader = XLADeviceLoader(prepare(make_loader(batch_size=6)), ctx)  # 32 samples: 6 batches
        syncs, remaining = [], []
        for _ in loader:
            assert ctx.state.active_dataloader is loader
            remaining.append(loader.remaining_in_epoch())
            with accumulate():
                syncs.append(ctx.sync_gradients)
        assert syncs == [False, False, True, False, False, True]
        assert remaining == [6, 5, 4, 3, 2, 1]
        assert loader.state_dict()["batches_yielded"] == 6 and len(loader) == 6


class FakeXM:
    """Records the torch_xla calls the optimizer makes."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def optimizer_step(self, optimizer: torch.optim.Optimizer, optimizer_args: dict[str, Any]) -> None:
        self.calls.append("optimizer_step")
        optimizer.step(**optimizer_args)

    def reduce_gradients(self, optimizer: torch.optim.Optimizer) -> None:
        self.calls.append("reduce_gradients")


def test_optimizer_reduces_once_per_window_and_after_clipping(monkeypatch: pytest.MonkeyPatch):
    fake = FakeXM()
    monkeypatch.setattr(xla, "_xm", lambda: fake)
    monkeypatch.setattr(xla, "_sync", lambda: fake.calls.append("sync"))
    with distributed(gradient_accumulation_steps=2) as ctx:
        ctx.state.strategy_state = xla.XLAState()
        model = make_model()
        _, [optimizer], _ = xla.prepare_training(ctx, [], [torch.optim.SGD(model.parameters(), lr=0.1)], [])
        ctx.state.optimizers.append(optimizer)
        for clip in (False, False, True, True):
            with accumulate():
                model(torch.ones(1, 8)).sum().backward()
                if clip and ctx.sync_gradients:
                    xla.clip_grad_norm_(ctx, model.parameters(), 1.0, 2.0)
                optimizer.step()
        assert fake.calls == ["optimizer_step", "sync", "reduce_gradients", "sync"]


# -- with torch_xla --------------------------------------------------------------------------------


@pytest.mark.xla
@needs_torch_xla
def test_the_loop_on_an_xla_device_matches_the_cpu():
    from distrib import gather

    reference = _train("single")
    with distributed(strategy="xla") as ctx:
        assert ctx.device.type == "xla"
        model = make_model()
        model, optimizer, loader = prepare(model, torch.optim.SGD(model.parameters(), lr=0.1), make_loader())
        assert isinstance(loader, XLADeviceLoader)
        run_loop(model, optimizer, loader, clip=1.0)
        state = xla.full_state_dict(ctx, model)
        assert gather(torch.tensor([ctx.rank], device=ctx.device)).cpu().tolist() == [0]
    assert state is not None and max_difference(state, reference) < 1e-4


def _train(strategy: str) -> dict[str, torch.Tensor]:
    with distributed(strategy=strategy, cpu=True):
        model = make_model()
        model, optimizer, loader = prepare(model, torch.optim.SGD(model.parameters(), lr=0.1), make_loader())
        run_loop(model, optimizer, loader, clip=1.0)
        return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.xla
@needs_torch_xla
def test_checkpoint_round_trip_on_an_xla_device(tmp_path: Path):
    with distributed(strategy="xla") as ctx:
        model = make_model()
        model, optimizer, loader = prepare(
            model, torch.optim.AdamW(model.parameters(), lr=0.01), make_loader()
        )
        run_loop(model, optimizer, loader)
        save_direct(ctx, tmp_path)
        saved = xla.full_state_dict(ctx, model)
    with distributed(strategy="xla") as ctx:
        model = make_model(5)
        model, optimizer = prepare(model, torch.optim.AdamW(model.parameters(), lr=0.01))
        load_direct(ctx, tmp_path)
        assert saved is not None and max_difference(xla.full_state_dict(ctx, model), saved) == 0.0
        assert len(optimizer.state_dict()["state"]) == len(list(model.parameters()))


def test_xla_checkpoint_with_another_number_of_models_is_refused(tmp_path: Path):
    """The XLA checkpoint functions (no device needed: they only read the prepared objects) refuse a file
    with fewer models or optimizers than the run, instead of loading part of it."""
    with distributed(cpu=True) as ctx:
        first, second = make_model(1), make_model(2)
        prepare(first, torch.optim.SGD(first.parameters(), lr=0.1), second)
        xla.save_training_state(ctx, writer := _writer(ctx, tmp_path))
        writer.finish()
        _manifest(ctx, tmp_path, writer)
    with distributed(cpu=True) as ctx:
        model = make_model(3)
        prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
        with pytest.raises(CheckpointMismatchError, match=r"holds 2 model\(s\), but this run prepared 1"):
            xla.load_training_state(ctx, _reader(tmp_path))
    with distributed(cpu=True) as ctx:
        models = [make_model(i) for i in range(3)]
        prepare(models[0], torch.optim.SGD(models[0].parameters(), lr=0.1), models[1], models[2])
        before = {k: v.clone() for k, v in models[0].state_dict().items()}
        with pytest.raises(CheckpointMismatchError, match=r"holds 2 model\(s\), but this run prepared 3"):
            xla.load_training_state(ctx, _reader(tmp_path))
    assert all(torch.equal(v, before[k]) for k, v in models[0].state_dict().items()), "nothing loaded"


def _writer(ctx: Any, directory: Path) -> Any:
    from distrib.checkpointing._writer import CheckpointWriter

    return CheckpointWriter(directory, ctx.rank)


def _manifest(ctx: Any, directory: Path, writer: Any) -> None:
    from distrib.checkpointing._manifest import build, write_manifest

    meta = {"world_size": 1, "step": 0, "strategy": "xla"}
    write_manifest(directory, build(meta, writer.ledger.entries(), 0))


def _reader(directory: Path) -> Any:
    from distrib.checkpointing._manifest import read_manifest
    from distrib.checkpointing._reader import CheckpointReader

    return CheckpointReader(directory, read_manifest(directory))


def test_device_loader_saves_the_position_the_loop_sees(monkeypatch: pytest.MonkeyPatch):
    """A checkpoint taken while MpDeviceLoader has read the whole epoch ahead still records the loop's
    position (and the fingerprint agrees with it); after the loop, the next epoch."""

    def read_everything_first(self: XLADeviceLoader) -> Any:
        return iter(list(self.loader))

    monkeypatch.setattr(XLADeviceLoader, "_device_loader", read_everything_first)
    with distributed(seed=0) as ctx:
        loader = XLADeviceLoader(prepare(make_loader(batch_size=6)), ctx)
        it = iter(loader)
        next(it), next(it)
        state, upcoming = loader.state_dict(), loader.upcoming()
        assert (state["epoch"], state["samples_consumed"]) == (0, 12)
        assert (upcoming["epoch"], upcoming["consumed"]) == (0, 12) and len(upcoming["next"]) == 6
        for _ in it:
            pass
        assert (loader.state_dict()["epoch"], loader.state_dict()["samples_consumed"]) == (1, 0)
