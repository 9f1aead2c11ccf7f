import math

import pytest

from stepseg.schedule import LrSchedule
from stepseg.settings import TrainSettings

PAPER_KEYS = {
    "schedule": "plateau_cosine",
    "lr": 3e-4,
    "epochs": 1000,
    "plateau_window": 15,
    "plateau_factor": 2.5,
    "plateau_min_decrease": 5e-3,
    "restart_below_lr": 1e-5,
    "restart_lr": 1e-4,
    "cosine_epochs": 100,
}
PAPER = TrainSettings.for_variant(PAPER_KEYS)


def settings(**keys) -> TrainSettings:
    return TrainSettings.for_variant(keys)


def test_lr_kept_while_the_moving_average_loss_falls_fast_enough():
    sched = LrSchedule(PAPER)
    for epoch in range(40):
        assert sched.step(1.0 - 0.01 * epoch) == 3e-4


def test_plateau_divides_by_2_5_and_restarts_the_window():
    sched = LrSchedule(PAPER)
    lrs = [sched.step(0.5) for _ in range(30)]
    assert lrs[:14] == [3e-4] * 14
    assert lrs[14] == pytest.approx(3e-4 / 2.5)
    assert lrs[15:29] == [pytest.approx(3e-4 / 2.5)] * 14
    assert lrs[29] == pytest.approx(3e-4 / 2.5**2)


def test_plateau_compares_older_seven_with_newer_eight():
    sched = LrSchedule(PAPER)
    # older 7 epochs at 1.0, newer 8 at 0.994: decrease 0.006 >= 5e-3, so lr stays
    for loss in [1.0] * 7 + [0.994] * 7:
        sched.step(loss)
    assert sched.step(0.994) == 3e-4
    sched = LrSchedule(PAPER)
    for loss in [1.0] * 7 + [0.996] * 7:
        sched.step(loss)
    assert sched.step(0.996) == pytest.approx(3e-4 / 2.5)


def test_restart_and_cosine_to_the_end_of_training():
    sched = LrSchedule(PAPER)
    epochs = 0
    while sched.cosine_start is None:
        sched.step(0.5)
        epochs += 1
    # 3e-4 / 2.5^k < 1e-5 first for k = 4: 4 plateaus of 15 epochs
    assert epochs == 60
    assert sched.lr == 1e-4
    lrs = []
    while not sched.finished:
        lrs.append(sched.step(0.5))
    assert len(lrs) == 100
    assert lrs[49] == pytest.approx(1e-4 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12)


def test_cosine_schedule_of_the_released_code():
    sched = LrSchedule(settings(schedule="cosine", lr=1.7e-4, epochs=300))
    lrs = [sched.lr]
    while not sched.finished:
        lrs.append(sched.step(1.0))
    assert len(lrs) == 301
    assert lrs[150] == pytest.approx(0.85e-4)
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12)


def test_max_epochs_end_a_paper_schedule():
    sched = LrSchedule(settings(**{**PAPER_KEYS, "epochs": 5}))
    for _ in range(5):
        sched.step(1.0)
    assert sched.finished


def test_state_round_trip_continues_identically():
    a = LrSchedule(PAPER)
    for k in range(37):
        a.step(0.5 + 0.001 * (k % 3))
    b = LrSchedule(PAPER)
    b.load_state_dict(a.state_dict())
    for k in range(100):
        assert a.step(0.4) == b.step(0.4), k
    assert a.state_dict() == b.state_dict()


def test_unknown_schedule_is_refused():
    with pytest.raises(ValueError, match=r"train\.schedule: expected one of .*, got 'step'"):
        settings(**{**PAPER_KEYS, "schedule": "step"})
