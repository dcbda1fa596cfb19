"""Each dataset generated once (issue 14 items 3-5): one generation for concurrent requests
(the store's claim), a smaller images_per_class served from a larger dataset (0 new images), the
crashed claimant's claim taken over, and one dataset request per distinct generation setting
(the MLflow lineage of a trial's dataset: tests/test_tracking.py).

The generation here runs in-process (`executor="inline"`: one ShardWorker, what one Ray Data
actor runs) with the procedural shapes generator: what is under test is what happens around
generation (claims, layout, manifests, serving), not Ray Data.
"""
from __future__ import annotations

import dataclasses
import threading
import time
from collections import Counter

import pyarrow.parquet as pq
import pytest

from regft import store as st
from regft.generate import GenerationConfig, generate_dataset, plan_dataset

CLASSES = 3
SHARD = 5  # does not divide a class's images: shards straddle class boundaries


def _cfg(store, per_class: int, **kw) -> GenerationConfig:
    return GenerationConfig(task="shapes", generator="shapes", max_classes=CLASSES,
                            images_per_class=per_class, steps=1, shard_size=SHARD, batch_size=4,
                            store=str(store), progress=False, samples=False, **kw)


def _rows(path) -> dict[str, bytes]:
    """{item_id: png} over the shards the manifest lists, failing on a duplicate id."""
    fs, paths = st.shard_paths(path, st.load_manifest(path))
    out = {}
    for p in paths:
        t = pq.read_table(p, filesystem=fs)
        for item_id, img in zip(t.column("item_id").to_pylist(), t.column("image").to_pylist()):
            assert item_id not in out, f"duplicate {item_id}"
            out[item_id] = img
    return out


def _ids(per_class: int) -> set[str]:
    return {f"{k:05d}-{i:06d}" for k in range(CLASSES) for i in range(per_class)}


@pytest.mark.timeout(120)
def test_two_concurrent_requests_generate_one_copy(tmp_path):
    cfg = _cfg(tmp_path, 8)
    start, results, errors = threading.Barrier(2), [], []

    def request():
        start.wait()
        try:
            results.append(generate_dataset(cfg, executor="inline"))
        except BaseException as e:  # reported below, with the other thread's result
            errors.append(e)

    threads = [threading.Thread(target=request) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert sorted(r.generated for r in results) == [0, CLASSES * 8]  # one generation, one wait
    assert results[0].path == results[1].path
    rows = _rows(results[0].path)
    assert len(rows) == CLASSES * 8 and set(rows) == _ids(8)  # one copy: counted, ids unique
    assert st.read_table(results[0].path).num_rows == CLASSES * 8
    assert not st._claim_files(results[0].path)  # released


@pytest.mark.timeout(120)
def test_fewer_per_class_is_served_from_the_larger_dataset(tmp_path):
    big = generate_dataset(_cfg(tmp_path, 8), executor="inline")
    small = generate_dataset(_cfg(tmp_path, 4), executor="inline")
    assert big.generated == CLASSES * 8 and small.generated == 0
    assert small.dataset_id != big.dataset_id  # its own content id: 4 per class
    m = st.load_manifest(small.path)
    assert m["complete"] and m["derived_from"]["dataset_id"] == big.dataset_id
    assert m["class_counts"] == [4] * CLASSES and m["runtime"]["generated_images"] == 0
    big_rows, small_rows = _rows(big.path), _rows(small.path)
    assert set(small_rows) == _ids(4)  # exactly the first 4 of each class ...
    assert all(small_rows[i] == big_rows[i] for i in small_rows)  # ... the same images
    # what a trial reads: only the small dataset's shards, and each item keeps its split
    _, paths = st.split_shards(small.path, "train", 0.25)
    assert all(p.startswith(small.path) for p in paths)
    for split in ("train", "val"):
        small_split = set(st.read_table(small.path, split, 0.25).column("item_id").to_pylist())
        big_split = set(st.read_table(big.path, split, 0.25).column("item_id").to_pylist())
        assert small_split == big_split & _ids(4)
    again = generate_dataset(_cfg(tmp_path, 4), executor="inline")
    assert again.generated == 0 and again.path == small.path


@pytest.mark.timeout(120)
def test_more_per_class_generates_only_the_images_the_smaller_dataset_lacks(tmp_path):
    small = generate_dataset(_cfg(tmp_path, 4), executor="inline")
    big = generate_dataset(_cfg(tmp_path, 8), executor="inline")
    assert small.generated == CLASSES * 4 and big.generated == CLASSES * 4  # the other half
    m = st.load_manifest(big.path)
    assert m["derived_from"]["dataset_id"] == small.dataset_id
    assert m["derived_from"]["copied_images"] == CLASSES * 4 and m["class_counts"] == [8] * CLASSES
    assert not (tmp_path / big.dataset_id / "_grow").exists()
    big_rows, small_rows = _rows(big.path), _rows(small.path)
    assert set(big_rows) == _ids(8) and all(big_rows[i] == small_rows[i] for i in small_rows)
    fresh = generate_dataset(_cfg(tmp_path / "fresh", 8), executor="inline")
    assert _rows(fresh.path) == big_rows  # the same dataset as one generated from scratch


@pytest.mark.timeout(120)
def test_the_first_images_of_a_class_do_not_depend_on_the_count(tmp_path):
    """What serving a prefix rests on: a fresh 4-per-class generation makes the same images as
    the first 4 per class of an 8-per-class one (seeds hash task, class, index, base seed)."""
    fresh = generate_dataset(_cfg(tmp_path / "a", 4), executor="inline")
    big = generate_dataset(_cfg(tmp_path / "b", 8), executor="inline")
    assert fresh.generated == CLASSES * 4
    fresh_rows, big_rows = _rows(fresh.path), _rows(big.path)
    assert fresh_rows == {i: big_rows[i] for i in _ids(4)}


@pytest.mark.timeout(60)
def test_a_waiter_waits_for_a_live_holder(tmp_path):
    path = str(tmp_path / "ds")
    held = st.claim(path, lambda: False, heartbeat_s=0.1, stale_s=1.0, poll_s=0.05)
    released = []

    def hold():
        time.sleep(2.5)  # longer than stale_s: only the heartbeat keeps the claim alive
        released.append(time.monotonic())
        held.release()

    t = threading.Thread(target=hold)
    t.start()
    second = st.claim(path, lambda: False, heartbeat_s=0.1, stale_s=1.0, poll_s=0.05)
    got = time.monotonic()
    t.join()
    second.release()
    assert released and got >= released[0]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("uri", [False, True], ids=["local", "file-uri"])
def test_a_crashed_claimants_claim_is_taken_over(tmp_path, uri):
    path = f"file://{tmp_path / 'ds'}" if uri else str(tmp_path / "ds")  # URI: pyarrow's path
    st.Claim(path).write()  # what a claimant that died leaves: its file, and no heartbeat
    assert len(st._claim_files(path)) == 1
    t0 = time.monotonic()
    mine = st.claim(path, lambda: False, heartbeat_s=0.1, stale_s=1.0, poll_s=0.05)
    waited = time.monotonic() - t0
    assert 1.0 <= waited < 10, waited
    assert list(st._claim_files(path)) == [mine.name]
    mine.release()
    assert not (tmp_path / "ds" / st.CLAIMS_DIR).exists()  # a finished dataset keeps no trace


@pytest.mark.timeout(60)
@pytest.mark.parametrize("uri", [False, True], ids=["local", "file-uri"])
def test_the_claims_folder_goes_with_the_last_claim_only(tmp_path, uri):
    path = f"file://{tmp_path / 'ds'}" if uri else str(tmp_path / "ds")
    first, second = st.Claim(path), st.Claim(path)
    first.write()
    second.write()
    first.release()  # another claim is still there: the folder and that claim stay
    assert list(st._claim_files(path)) == [second.name]
    second.release()
    assert not (tmp_path / "ds" / st.CLAIMS_DIR).exists()
    second.write()  # a claimant arriving after the folder went recreates it
    assert list(st._claim_files(path)) == [second.name]


@pytest.mark.timeout(120)
def test_a_waiter_reads_the_dataset_the_holder_finished(tmp_path):
    """A request that finds another process generating returns once that one is done, having
    generated nothing, and never sees the dataset incomplete."""
    cfg = _cfg(tmp_path, 6)
    plan = plan_dataset(cfg)
    holder = st.claim(plan.path, lambda: False)
    out = []
    waiter = threading.Thread(target=lambda: out.append(generate_dataset(cfg, executor="inline")))
    waiter.start()
    time.sleep(1.5)
    assert not out  # still waiting on the claim
    holder.release()  # as if the holder had crashed right after claiming: the waiter generates
    waiter.join()
    assert out[0].generated == CLASSES * 6 and st.load_manifest(out[0].path)["complete"]


# ----------------------------------------------------------------- lineage ---

def test_a_long_dataset_id_keeps_its_content_hash_as_digest():
    from regft.tracking import MAX_DIGEST_CHARS, DatasetLineage

    long_id = "a-task-name-of-forty-characters-exactly-0123456789abcdef"
    d = DatasetLineage(long_id, "/x", 1, 0, {}, {})
    assert d.digest() == "0123456789abcdef" and len(d.digest()) <= MAX_DIGEST_CHARS


def test_search_requests_one_dataset_per_distinct_setting():
    from regft.search import dataset_requests
    from regft.search_space import parse_search_space

    space = parse_search_space({"parameters": {
        "lr": {"distribution": "loguniform", "low": 1e-4, "high": 1e-3},
        "guidance": {"distribution": "choice", "values": [1.0, 5.0]},
        "images_per_class": {"distribution": "choice", "values": [4, 8]}}})
    requests, problems = dataset_requests(GenerationConfig(task="shapes"), space)
    assert not problems and len(requests) == 4
    counts = [r.images_per_class for r in requests.values()]
    assert counts == [8, 8, 4, 4]  # the larger first: the smaller is then served from it
    assert Counter((r.guidance, r.images_per_class) for r in requests.values()) == {
        (g, n): 1 for g in (1.0, 5.0) for n in (4, 8)}
    assert all(dataclasses.replace(r, guidance=5.0, images_per_class=64) == GenerationConfig(task="shapes")
               for r in requests.values())
