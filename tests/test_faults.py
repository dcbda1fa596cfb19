"""regft.faults: one schema for the test hooks, and "once" across processes (a marker file)."""
import multiprocessing

import pytest

from regft import faults


def test_schema_names_one_point_and_a_mode():
    f = faults.Fault.from_dict({"after_epoch": 1, "marker": "m"})
    assert (f.mode, f.after_epoch, f.item_id, f.shard) == ("raise", 1, None, None)
    for bad in ({"after_epoch": 1}, {"marker": "m"}, {"marker": "m", "after_epoch": 1, "item_id": "x"},
                {"marker": "m", "shard": 1}, {"marker": "m", "after_epoch": 1, "mode": "disk_full"},
                {"marker": "m", "after_epoch": 1, "mode": "explode"},
                {"marker": "m", "after_epoch": 1, "exit_delay": 5}):
        with pytest.raises(ValueError, match="fault"):
            faults.Fault.from_dict(bad)


def test_training_fault_fires_once_on_rank_0_after_its_epoch(tmp_path):
    fault = {"after_epoch": 2, "marker": str(tmp_path / "fired")}
    faults.after_epoch(fault, 1, 0)  # not yet
    faults.after_epoch(fault, 2, 1)  # another rank
    faults.after_epoch(None, 2, 0)
    assert not (tmp_path / "fired").exists()
    with pytest.raises(RuntimeError, match="injected fault after epoch 2"):
        faults.after_epoch(fault, 2, 0)
    faults.after_epoch(fault, 2, 0)  # a restarted worker goes on


def test_generation_fault_fires_at_its_item(tmp_path):
    fault = {"item_id": "00002-000003", "marker": str(tmp_path / "fired")}
    faults.at_items(fault, ["00001-000001"])
    with pytest.raises(RuntimeError, match="injected fault at item 00002-000003"):
        faults.at_items(fault, ["00002-000002", "00002-000003"])
    faults.at_items(fault, ["00002-000003"])


def test_disk_full_is_true_once_for_its_shard(tmp_path):
    fault = {"mode": "disk_full", "shard": 2, "marker": str(tmp_path / "fired")}
    assert [faults.disk_full(fault, k) for k in (1, 2, 2)] == [False, True, False]
    assert not faults.disk_full(None, 2)


def _claim(marker: str, out) -> None:
    out.put(faults.fire_once(faults.Fault(marker=marker, after_epoch=1)))


def test_once_holds_across_processes(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_claim, args=(str(tmp_path / "m"), out)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert sorted(out.get(timeout=5) for _ in procs) == [False, False, False, True]
