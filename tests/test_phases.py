"""regft.phases: a trial's wall time in named phases, and the report readers setting them aside."""
import pytest

from regft import phases
from regft.reports import EpochReport, parse_result


def test_phases_sum_named_intervals_and_move_between_them():
    t = iter([0.0, 2.0, 10.0, 13.5])
    p = phases.Phases(clock=lambda: next(t))
    with p("train"):
        pass
    with p("train"):
        pass
    p.move("train", "data_start", 1.5)
    assert p.metrics() == {"phase/data_start_s": 1.5, "phase/train_s": 4.0}
    with pytest.raises(ValueError, match="unknown phase"):
        p.add("trainng", 1.0)


def test_driver_phases_from_the_worker_stamps():
    last = {"phase/train_s": 30.0, "phase/eval_s": 5.0, phases.TRIAL_FN_AT: 101.0,
            phases.SENT_AT: 150.0}
    got = phases.driver_phases(pending_at=90.0, actor_at=100.0, last=last, received_at=152.0,
                               complete_at=160.0)
    assert got == {"train": 30.0, "eval": 5.0, "scheduling_wait": 10.0, "trial_start": 1.0,
                   "final_checkpoint": 2.0, "teardown": 8.0, "wall": 60.0}
    m = phases.summary_metrics(got)
    assert m["phase/wall_s"] == 60.0 and m["phase/non_training_share"] == pytest.approx(0.5)
    rows = dict((n, s) for n, s, _ in phases.breakdown({k: v for k, v in got.items() if k != "wall"}, 60.0))
    assert rows["other"] == pytest.approx(60.0 - 46.0)  # scheduling_wait is outside the wall


def test_reports_with_phase_keys_parse_as_without():
    r = EpochReport(epoch=1, train_loss=1.0, ce_loss=1.0, vc_loss=0.0, vc_variance=0.0,
                    vc_covariance=0.0, grad_norm=1.0, lr=1e-3, images_per_s=10.0,
                    synthetic_val_acc=0.5, div_magnitude=1.0, div_direction=1.0,
                    effective_rank=2.0, select_metric=0.5)
    wire = {**r.to_dict(), "phase/train_s": 3.0, phases.SENT_AT: 1e9, "trial_id": "x"}
    assert parse_result(wire) == r


def test_trial_metrics_keep_phase_seconds_and_drop_the_wall_clock_stamps():
    """A trial's MLflow metrics (mlflow_store.numeric_metrics, what tracking logs per report):
    phase seconds are metrics; the worker's wall-clock stamps only time the driver's phases."""
    from regft.mlflow_store import numeric_metrics

    wire = {"epoch": 2, "select_metric": 0.5, "phase/train_s": 3.0, phases.TRIAL_FN_AT: 1.7e9,
            phases.SENT_AT: 1.7e9 + 40}
    assert numeric_metrics(wire) == {"epoch": 2.0, "select_metric": 0.5, "phase/train_s": 3.0}
