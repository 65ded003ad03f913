from alchemist_worker.continual.co_scheduler import CoScheduler, ServingLoad
from alchemist_worker.continual.settings import TrainerSettings


def test_training_yields_when_the_queue_is_deep_and_runs_long_when_idle() -> None:
    cs = CoScheduler(TrainerSettings(max_queue_depth=3, slice_ms=20, idle_slice_ms=200))
    assert cs.slice_budget(ServingLoad(waiting=3, running=0)) == 0.0
    assert cs.yielded == 1
    assert cs.slice_budget(ServingLoad(waiting=0, running=0)) == 0.2
    assert cs.slice_budget(ServingLoad(waiting=0, running=0, arrivals_pending=True)) <= 0.01


def test_busy_slices_spend_a_share_of_decode_time_earned_iteration_by_iteration() -> None:
    cs = CoScheduler(TrainerSettings(slice_ms=20), busy_share=0.1)
    busy = ServingLoad(waiting=0, running=4)
    assert cs.slice_budget(busy) == 0.0  # no credit before any decode iteration
    cs.observe_iteration(decode=True, seconds=0.030, slice_after_s=0.0)
    assert abs(cs.slice_budget(busy) - 0.003) < 1e-9
    # The slice overran (one indivisible operator took 12 ms): the next iterations run without training.
    cs.observe_iteration(decode=True, seconds=0.030, slice_after_s=0.012)
    skipped = 0
    while cs.slice_budget(busy) == 0.0:
        skipped += 1
        cs.observe_iteration(decode=True, seconds=0.030, slice_after_s=0.0)
    assert skipped == 3  # 12 ms of overrun paid back at 3 ms per 30 ms iteration
    assert cs.slice_budget(ServingLoad(waiting=1, running=4)) == 0.0  # a prefill is next
    assert cs.slice_budget(ServingLoad(waiting=0, running=4, after_prefill=True)) == 0.0


def test_aimd_halves_near_the_bound_and_recovers_slowly() -> None:
    cs = CoScheduler(TrainerSettings(slice_ms=20, itl_p99_bound_ms=50), busy_share=1.0, window=16)
    for _ in range(7):
        cs.observe_iteration(decode=True, seconds=0.040, slice_after_s=0.010)  # ITL 50 ms: at the bound
    assert cs.factor == 1.0  # too few samples to judge
    cs.observe_iteration(decode=True, seconds=0.040, slice_after_s=0.010)
    assert cs.factor == 0.5
    for _ in range(7):
        cs.observe_iteration(decode=True, seconds=0.040, slice_after_s=0.005)  # 45 ms: between the marks
    assert cs.factor == 0.5
    for _ in range(16):
        cs.observe_iteration(decode=True, seconds=0.020, slice_after_s=0.002)  # well below: grow slowly
    assert cs.factor == 0.55  # once the window holds only fast samples
