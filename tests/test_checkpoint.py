"""regft.checkpoint: the checkpoint folder format and the scans of a run's checkpoints."""
import json

import pyarrow.fs as pafs
import pytest
import torch

from regft import checkpoint
from regft.reports import CheckpointMeta, EpochReport, FinalReport

EPOCH_KEYS = ("train_loss", "ce_loss", "vc_loss", "vc_variance", "vc_covariance", "grad_norm", "lr",
              "images_per_s", "synthetic_val_acc", "div_magnitude", "div_direction",
              "effective_rank", "select_metric")


def epoch_meta(epoch: int) -> CheckpointMeta:
    report = EpochReport(epoch=epoch, **{k: 0.1 * epoch for k in EPOCH_KEYS})
    return CheckpointMeta(epoch=epoch, final=False, task="t", classnames=["a", "b"], model="tiny",
                          pretrained=None, metrics=report)


def final_meta(epoch: int) -> CheckpointMeta:
    report = FinalReport(epoch=epoch, best_epoch=1, best_alpha=0.5, selection_metric="synthetic_val",
                         alpha_rule="knee", select_metric=0.7, curves={"synthetic_val": [(0.5, 0.7)]},
                         accuracy={})
    return CheckpointMeta(epoch=epoch, final=True, task="t", classnames=["a", "b"], model="tiny",
                          pretrained=None, metrics=report, alpha=0.5, architecture=None)


def write(folder, meta, value: float, train_state=None):
    folder.mkdir(parents=True)
    checkpoint.save(str(folder), {"w": torch.full((2,), value)}, meta, train_state)


def test_save_and_load_round_trip(tmp_path):
    write(tmp_path / "c", epoch_meta(1), 1.0, {"best": {"epoch": 1}})
    state, meta = checkpoint.load(str(tmp_path / "c"))
    assert torch.equal(state["w"], torch.ones(2)) and meta == epoch_meta(1)
    assert checkpoint.load_train_state(str(tmp_path / "c")) == {"best": {"epoch": 1}}
    on_disk = json.loads((tmp_path / "c" / checkpoint.META_FILE).read_text())
    assert on_disk == epoch_meta(1).to_dict()


def test_find_epoch_and_final_scan_a_run_folder(tmp_path):
    run = tmp_path / "run"
    write(run / "checkpoint_2026-01-01_00-00-01", epoch_meta(1), 1.0)
    write(run / "checkpoint_2026-01-01_00-00-02", epoch_meta(2), 2.0)
    write(run / "checkpoint_2026-01-01_00-00-03", final_meta(2), 3.0)
    write(run / "checkpoint_2026-01-01_00-00-04", final_meta(2), 4.0)  # a replayed final report
    (run / "checkpoint_2026-01-01_00-00-05").mkdir()  # being written: no meta yet
    (run / "checkpoint_2026-01-01_00-00-05" / checkpoint.META_FILE).write_text("{")
    (run / "notes").mkdir()
    fs = pafs.LocalFileSystem()
    found = checkpoint.find_epoch(fs, str(run), 2)
    assert found.endswith("00-00-02")
    assert torch.equal(checkpoint.load_weights(fs, found)["w"], torch.full((2,), 2.0))
    assert checkpoint.find_epoch(fs, str(run), 3) is None
    assert checkpoint.find_final(fs, str(run)).endswith("00-00-04")
    assert checkpoint.find_final(fs, str(tmp_path / "missing")) is None


def test_a_meta_with_unknown_keys_is_refused(tmp_path):
    write(tmp_path / "c", epoch_meta(1), 1.0)
    path = tmp_path / "c" / checkpoint.META_FILE
    path.write_text(json.dumps({**json.loads(path.read_text()), "bogus": 1}))
    with pytest.raises(ValueError, match="unknown key 'bogus'"):
        checkpoint.load(str(tmp_path / "c"))


def test_drop_train_state_removes_only_the_optimizer_state(tmp_path):
    write(tmp_path / "c", epoch_meta(1), 1.0, {"best": {"epoch": 1}})
    fs = pafs.LocalFileSystem()
    assert checkpoint.drop_train_state(fs, str(tmp_path / "c")) is True
    assert not (tmp_path / "c" / checkpoint.STATE_FILE).exists()
    state, meta = checkpoint.load(str(tmp_path / "c"))  # the weights and meta stay readable
    assert torch.equal(state["w"], torch.ones(2)) and meta.epoch == 1
    assert checkpoint.drop_train_state(fs, str(tmp_path / "c")) is False  # nothing left to drop
    assert checkpoint.drop_train_state(fs, str(tmp_path / "deleted-by-train")) is False


def test_kept_bytes_per_trial_prices_one_optimizer_state_not_one_per_epoch():
    """At real size (ViT-B/16 visual tower, 86.2 M fp32 parameters) one optimizer state is twice
    the weights: the policy keeps one or two of them, never one per kept epoch."""
    weights = 86_192_640 * 4
    adamw = checkpoint.adamw_state_bytes(weights)
    assert adamw == 2 * weights
    best_one = checkpoint.kept_bytes_per_trial(weights, adamw, checkpoint.Policy(keep_best=1))
    # best + latest (with optimizer), and one more of each while the next epoch uploads
    assert best_one == 3 * weights + 2 * adamw
    best_three = checkpoint.kept_bytes_per_trial(weights, adamw, checkpoint.Policy(keep_best=3))
    assert best_three - best_one == 2 * weights  # more best epochs cost weights only
    assert checkpoint.finished_bytes_per_trial(weights, checkpoint.Policy(keep_best=1)) == 2 * weights
    assert checkpoint.kept_bytes_per_trial(weights, adamw) == best_one  # the default policy
    with pytest.raises(ValueError, match="keep_best"):
        checkpoint.Policy(keep_best=0)
