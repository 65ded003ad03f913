import threading
import time

import pytest
import torch
from alchemist_worker.continual.step_cursor import StepCancelled, StepCursor, cursor_yield
from torch import nn


def make_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Sequential(nn.Linear(256, 256), nn.Tanh()) for _ in range(8)])


def train_step(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    model.zero_grad()
    for chunk in x.split(16):
        model(chunk).pow(2).mean().backward()
        cursor_yield()
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


def test_a_sliced_step_computes_exactly_the_unsliced_one() -> None:
    x = torch.randn(64, 256)
    reference = train_step(make_model(), x)
    model = make_model()
    cursor = StepCursor(lambda: train_step(model, x), yield_at_modules=list(model))
    slices_done = 0
    while not cursor.advance(0.0005):
        slices_done += 1
        with torch.inference_mode():  # serving uses the same model between slices
            model(torch.randn(4, 256))
    grads = cursor.result()
    assert slices_done > 3 and cursor.yield_points > 50
    for got, want in zip(grads, reference, strict=True):
        assert torch.equal(got, want)


def test_slices_respect_their_budget_within_a_yield_point() -> None:
    x = torch.randn(512, 256)
    model = make_model()
    cursor = StepCursor(lambda: train_step(model, x), yield_at_modules=list(model))
    durations = []
    while True:
        started = time.perf_counter()
        done = cursor.advance(0.002)
        durations.append(time.perf_counter() - started)
        if done:
            break
    durations.sort()
    assert len(durations) > 3
    assert durations[len(durations) // 2] < 0.02  # median slice: the budget plus one op, not the whole step


def test_zero_budget_yields_without_running() -> None:
    ran = threading.Event()
    cursor = StepCursor(lambda: ran.set())
    assert cursor.advance(0.0) is False and not ran.is_set()
    assert cursor.advance(1.0) is True and ran.is_set()


def test_errors_reach_the_advancing_thread() -> None:
    def broken() -> None:
        raise ValueError("bad batch")

    cursor = StepCursor(broken)
    assert cursor.advance(1.0)
    assert cursor.failed
    with pytest.raises(ValueError, match="bad batch"):
        cursor.result()


def test_cancel_stops_a_paused_step_at_its_next_yield_point() -> None:
    model = make_model()
    x = torch.randn(512, 256)
    cursor = StepCursor(lambda: train_step(model, x))
    assert not cursor.advance(0.0001)
    cursor.cancel()
    assert cursor.done
    with pytest.raises(StepCancelled):
        cursor.result()
    never = StepCursor(lambda: None)
    never.cancel()
    with pytest.raises(StepCancelled):
        never.result()


def test_resume_and_pause_callbacks_wrap_each_slice() -> None:
    events: list[str] = []
    model = make_model()
    x = torch.randn(64, 256)
    cursor = StepCursor(
        lambda: train_step(model, x),
        on_resume=lambda: events.append("in"),
        on_pause=lambda: events.append("out"),
    )
    while not cursor.advance(0.0005):
        pass
    assert events[:2] == ["in", "out"] and len(events) == 2 * cursor.slices
