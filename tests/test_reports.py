"""regft.reports: the typed wire format of the worker's reports and checkpoint meta."""
import json
import math

import pytest

from regft.reports import (
    BOOKKEEPING_KEYS,
    CheckpointMeta,
    DivergedReport,
    EpochReport,
    FinalReport,
    ReportError,
    SplitNumbers,
    parse_result,
    report_from_dict,
)

EPOCH = {"epoch": 1, "train_loss": 1.2, "ce_loss": 1.1, "vc_loss": 0.1, "vc_variance": 0.5,
         "vc_covariance": 0.01, "grad_norm": 3.0, "lr": 1e-4, "images_per_s": 50.0,
         "synthetic_val_acc": 0.5, "div_magnitude": 0.2, "div_direction": 0.9,
         "effective_rank": 7.0, "select_metric": 0.5}
FINAL = {"epoch": 2, "best_epoch": 2, "best_alpha": 0.5, "alpha_curve": [[0.0, 0.4], [0.5, 0.6], [1.0, 0.7]],
         "selection_metric": "synthetic_val", "alpha_rule": "knee", "select_metric": 0.6, "final": True,
         "alpha_curve_real_test": [[0.0, 0.3], [0.5, 0.5], [1.0, 0.45]],
         "zs_synthetic_val_acc": 0.4, "zs_real_test_acc": 0.3, "ft_synthetic_val_acc": 0.7,
         "ft_real_test_acc": 0.45, "ens_synthetic_val_acc": 0.6, "ens_real_test_acc": 0.5}


def test_wire_dicts_round_trip_with_the_same_keys_in_the_same_order():
    for data, cls in ((EPOCH, EpochReport), (FINAL, FinalReport)):
        report = cls.from_dict(data)
        assert list(report.to_dict()) == list(data) and report.to_dict() == data
        assert cls.from_dict(json.loads(json.dumps(report.to_dict()))) == report
    with_real_val = {**EPOCH, "real_val_acc": 0.25}
    assert EpochReport.from_dict(with_real_val).real_val_acc == 0.25
    assert "real_val_acc" not in EpochReport.from_dict(EPOCH).to_dict()


def test_final_report_is_typed_by_split():
    final = FinalReport.from_dict(FINAL)
    assert final.curves["synthetic_val"][1] == (0.5, 0.6)
    assert list(final.curves) == ["synthetic_val", "real_test"]
    assert final.accuracy["real_test"] == SplitNumbers(0.3, 0.45, 0.5)
    assert final.acc("ens", "synthetic_val") == 0.6 and final.acc("zs", "real_val") is None
    # the selection split decides which curve is the wire's `alpha_curve`
    by_real_val = FinalReport(**{**final.__dict__, "selection_metric": "real_test"})
    assert by_real_val.to_dict()["alpha_curve"] == FINAL["alpha_curve_real_test"]
    assert by_real_val.to_dict()["alpha_curve_synthetic_val"] == FINAL["alpha_curve"]


def test_diverged_report_carries_its_flags():
    d = DivergedReport(epoch=3, train_loss=math.nan, ce_loss=math.nan, vc_loss=0.0, grad_norm=math.inf,
                       lr=0.1).to_dict()
    assert d["diverged"] is True and d["final"] is False and d["select_metric"] == 0.0
    assert isinstance(report_from_dict(d), DivergedReport)
    with pytest.raises(ReportError, match="diverged"):
        DivergedReport.from_dict({**d, "diverged": False})


@pytest.mark.parametrize("cls, data", [(EpochReport, EPOCH), (FinalReport, FINAL)])
def test_unknown_and_missing_keys_are_errors(cls, data):
    with pytest.raises(ReportError, match="unknown key 'selct_metric'"):
        cls.from_dict({**data, "selct_metric": 1.0})
    missing = dict(data)
    del missing["select_metric"]
    with pytest.raises(ReportError, match="missing key 'select_metric'"):
        cls.from_dict(missing)


def test_final_report_rejects_a_split_without_all_three_numbers_and_odd_curves():
    partial = {k: v for k, v in FINAL.items() if k != "ft_real_test_acc"}
    with pytest.raises(ReportError, match="real_test"):
        FinalReport.from_dict(partial)
    with pytest.raises(ReportError, match="alpha_curve_test"):
        FinalReport.from_dict({**FINAL, "alpha_curve_test": []})
    with pytest.raises(ReportError, match="curves"):
        FinalReport.from_dict({**FINAL, "curves": {}})


def test_parse_result_drops_tunes_bookkeeping_only():
    result = {**FINAL, "trial_id": "abc", "training_iteration": 3, "time_total_s": 1.0,
              "timestamp": 1, "config": {"lr": 1e-4}, "date": "x", "hostname": "h", "pid": 1,
              "node_ip": "1.2.3.4", "done": True, "checkpoint_path": "/x", "checkpoint_dir_name": "c"}
    assert parse_result(result) == FinalReport.from_dict(FINAL)
    assert isinstance(parse_result({**EPOCH, "trial_id": "abc"}), EpochReport)
    with pytest.raises(ReportError, match="unknown key 'mystery'"):
        parse_result({**EPOCH, "mystery": 1})


def test_bookkeeping_keys_cover_what_ray_adds():
    from ray.tune import result as tr
    from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY

    ray_keys = {*tr.AUTO_RESULT_KEYS, *tr.DEBUG_METRICS, *tr.DEFAULT_EXPERIMENT_INFO_KEYS,
                tr.DONE, tr.SHOULD_CHECKPOINT, tr.TIMESTEPS_THIS_ITER, tr.EPISODES_THIS_ITER,
                tr.RESULT_DUPLICATE, tr.TRIAL_INFO, CHECKPOINT_PATH_KEY}
    assert ray_keys <= BOOKKEEPING_KEYS


def test_checkpoint_meta_round_trips_and_checks_its_kind():
    epoch_meta = {"epoch": 1, "final": False, "task": "colours", "classnames": ["a", "b"],
                  "model": "tiny", "pretrained": None, "metrics": EPOCH}
    final_meta = {"epoch": 2, "final": True, "alpha": 0.5, "task": "colours", "classnames": ["a", "b"],
                  "model": "tiny", "pretrained": None, "architecture": {"model_cfg": {}},
                  "metrics": FINAL}
    for data in (epoch_meta, final_meta):
        meta = CheckpointMeta.from_dict(data)
        assert meta.to_dict() == data and list(meta.to_dict()) == list(data)
    older = {k: v for k, v in final_meta.items() if k != "architecture"}  # written before it was recorded
    assert CheckpointMeta.from_dict(older).architecture is None
    with pytest.raises(ReportError, match="final=True"):
        CheckpointMeta.from_dict({**final_meta, "metrics": EPOCH})
    with pytest.raises(ReportError, match="unknown key 'best'"):
        CheckpointMeta.from_dict({**epoch_meta, "best": 1})


def test_a_trial_that_failed_before_its_first_report_is_an_outcome_without_report():
    """Tune fills a failed trial's metrics with its bookkeeping keys only: no report to parse
    (the search used to stop on it with a ReportError)."""
    from types import SimpleNamespace

    from regft.search import TrialOutcome  # imports Ray (no cluster)

    metrics = {"trial_id": "ab12", "date": "2026-12-06", "done": False, "training_iteration": 0,
               "hostname": "h", "node_ip": "127.0.0.1", "pid": 1, "timestamp": 0}
    failed = SimpleNamespace(metrics=metrics, config={"lr": 1e-3},
                             error=RuntimeError("ray::ImplicitFunc.train()\n  File x.py\nOSError: gone"))
    outcome = TrialOutcome.from_result(failed)
    assert (outcome.trial_id, outcome.report, outcome.final) == ("ab12", None, False)
    assert outcome.error == "OSError: gone"
    assert TrialOutcome.from_result(SimpleNamespace(metrics=None, config=None, error=None)).report is None


def test_a_trial_error_is_one_line_and_a_user_error_its_own_message():
    from regft.errors import UserError
    from regft.search import error_line  # imports Ray (no cluster)

    class TaskUserError(UserError):  # the shape of Ray's RayTaskError(UserError)
        def __init__(self, cause):
            super().__init__("ray::ImplicitFunc.train() (pid=1)\n  File x.py\nUserError: ...")
            self.cause = cause

    assert error_line(TaskUserError(UserError("ingest worker: use --ingest ray_data"))) == \
        "ingest worker: use --ingest ray_data"
    assert error_line(UserError(["--a: bad", "--b: bad"])) == "--a: bad; --b: bad"
    remote = RuntimeError("ray::ImplicitFunc.train() (pid=1)\n  File x.py, line 3\nValueError: nan\n")
    assert error_line(remote) == "ValueError: nan"
