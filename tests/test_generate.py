"""Ray Data generation end to end on a 2-CPU local Ray: tiny pipeline (32 px, 2 steps), 3 classes.

One reference dataset (CLI, 2 actors of 1 CPU) is shared by the module; the fault tests regenerate
the same request in fresh stores and compare every image with it: byte for byte under the same
actor shape, and to within 1/255 on a few pixels when the actor's torch thread count differs
(oneDNN convolutions round differently per thread count and batch shape; see test_generators).
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import io
import json
import os
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest

from regft import store as st
from regft.cli import UserError
from regft.config import from_dict
from regft.generate import (
    ActorPlan,
    GenerationConfig,
    check_request,
    dataset_id,
    dataset_spec,
    ensure_dataset,
    generate_dataset,
    main,
    plan_actors,
)

CLASSES = ["red apple", "green pear", "yellow banana"]
PER_CLASS = 4
SHARD = 3  # 12 items -> 4 shards, classes straddle shard boundaries
ARGS = ["--generator", "tiny", "--images-per-class", str(PER_CLASS), "--steps", "2",
        "--shard-size", str(SHARD), "--batch-size", "2", "--no-progress"]


@pytest.fixture(scope="module")
def classnames_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("gen") / "fruit.txt"
    p.write_text("\n".join(CLASSES) + "\n")
    return p


def _cfg(classnames_file, store, **kw):
    base = dict(classnames_file=str(classnames_file), generator="tiny", images_per_class=PER_CLASS,
                steps=2, shard_size=SHARD, batch_size=2, store=str(store), progress=False)
    base.update(kw)
    return GenerationConfig(**base)


def _run_cli(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


def _images_by_id(path):
    """{item_id: png bytes} over every committed shard, failing on any duplicate."""
    out = {}
    for _, f in sorted(st.list_shards(path).items()):
        t = pq.read_table(f)
        for item_id, img in zip(t.column("item_id").to_pylist(), t.column("image").to_pylist()):
            assert item_id not in out, f"duplicate {item_id}"
            out[item_id] = img
    return out


def assert_same_images(got: dict, want: dict) -> None:
    """Same item ids; pixels equal up to float rounding (<= 1/255 on < 1 % of the pixels).
    A seed or prompt mix-up changes most pixels by far more (checked in test_generators)."""
    assert set(got) == set(want)
    for item_id in want:
        a, b = (np.asarray(st.decode_image(x[item_id])).astype(int) for x in (got, want))
        diff = np.abs(a - b)
        assert diff.max() <= 1 and (diff > 0).mean() < 1e-2, item_id


EXPECTED_IDS = {f"{k:05d}-{i:06d}" for k in range(len(CLASSES)) for i in range(PER_CLASS)}


@pytest.fixture(scope="module")
def reference(ray_local_module, classnames_file, tmp_path_factory):
    cache = tmp_path_factory.getbasetemp() / "regft-cache"
    mp = pytest.MonkeyPatch()
    mp.setenv("REGFT_CACHE", str(cache))
    store = tmp_path_factory.mktemp("ref-store")
    try:
        rc, out, err = _run_cli(["--classnames", str(classnames_file), "--store", str(store),
                                 "--num-actors", "2", *ARGS])
    finally:
        mp.undo()
    assert rc == 0, err
    path = out.split("dataset: ")[1].split("\n")[0]
    return {"store": store, "path": path, "out": out, "images": _images_by_id(path)}


# ------------------------------------------------------------- no Ray -------

def test_config_validation_reports_every_problem():
    cfg = GenerationConfig(images_per_class=0, resolution=30, steps=0, prompt_strategy="llm",
                           batch_size=0)
    problems = cfg.validate()
    assert len(problems) == 6
    for needle in ("task:", "images_per_class (--images-per-class) must be >= 1, got 0",
                   "resolution (--resolution) must be a positive multiple of 8", "got 30; e.g. 32",
                   "steps (--steps)", "prompt_strategy", "batch_size"):
        assert any(needle in p for p in problems), needle
    with pytest.raises(UserError, match="unknown key 'image_per_class'"):
        from_dict(GenerationConfig, {"task": "cars", "image_per_class": 4})
    cfg = from_dict(GenerationConfig, {"task": "cars", "guidance": 5, "generator": "tiny"})
    assert cfg.guidance == 5.0 and cfg.effective_resolution() == 32 and cfg.effective_output_size() == 32
    paper = GenerationConfig(task="cars")  # method.md defaults
    assert (paper.effective_resolution(), paper.effective_output_size(), paper.steps,
            paper.guidance, paper.images_per_class) == (512, 224, 50, 5.0, 64)


def test_dataset_id_hashes_what_determines_pixels_only(regft_cache, tmp_path):
    base = GenerationConfig(task="cars", generator="tiny", max_classes=3, store=str(tmp_path))
    task, gen = check_request(base)
    assert task.num_classes == 3 and task.gen_names[0] == "2000 AM General Hummer SUV"

    def did(**kw):
        cfg = dataclasses.replace(base, **kw)
        t, g = check_request(cfg)
        return dataset_id(dataset_spec(cfg, t, g.identity()))

    ref = did()
    assert ref.startswith("cars-") and ref == did()
    # execution details do not change the images, so they do not change the id
    for kw in ({"batch_size": 3}, {"num_actors": 2}, {"use_gpu": True}, {"shard_size": 5},
               {"store": str(tmp_path / "other")}, {"progress": False}):
        assert did(**kw) == ref, kw
    for kw in ({"seed": 1}, {"steps": 3}, {"guidance": 4.0}, {"images_per_class": 5},
               {"output_size": 24}, {"prompt_strategy": "plain"}, {"max_classes": 4},
               {"dtype": "bf16"}, {"resolution": 40}):
        assert did(**kw) != ref, kw


def test_default_store_is_env_then_cwd(monkeypatch):
    monkeypatch.delenv("REGFT_STORE", raising=False)
    assert GenerationConfig().effective_store() == "./regft_data"
    monkeypatch.setenv("REGFT_STORE", "s3://bucket/x")
    assert GenerationConfig().effective_store() == "s3://bucket/x"
    assert GenerationConfig(store="/d").effective_store() == "/d"


def test_cli_bad_input_exits_2_with_every_problem(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    rc, out, err = _run_cli(["nosuchtask", "--generator", "tiny", "--images-per-class", "0",
                             "--resolution", "30", "--store", str(blocker / "store")])
    assert rc == 2 and out == ""
    assert err.startswith("error: 4 problems:")
    for needle in ("unknown task 'nosuchtask'", "images_per_class", "resolution", "cannot write to"):
        assert needle in err, needle
    assert "Traceback" not in err


def test_cli_real_generator_offline_is_one_line_exit_2(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rc, out, err = _run_cli(["cars", "--store", str(tmp_path)])
    assert rc == 2
    assert err.count("\n") == 1 and "stable-diffusion-2-1-base" in err and "--generator tiny" in err


def test_actor_plan_from_cluster():
    cfg = GenerationConfig(task="t", generator="tiny")
    # CPU: one actor per node using all its CPUs (as fast as one plain process on that node)
    assert plan_actors(cfg, {"CPU": 2}, [2], 10) == ActorPlan(1, 2.0, 0.0, "cpu", 2)
    assert plan_actors(GenerationConfig(num_actors=2), {"CPU": 2}, [2], 10).num_cpus == 1.0
    # an actor never spans nodes: 1 actor on two 4-CPU nodes takes 4, not 8
    assert plan_actors(GenerationConfig(num_actors=1), {"CPU": 8}, [4, 4], 10).num_cpus == 4.0
    assert plan_actors(GenerationConfig(num_actors=3), {"CPU": 8}, [4, 4], 10).num_cpus == 2.0
    assert plan_actors(GenerationConfig(num_actors=2), {"CPU": 2}, [2], 1).num_actors == 1
    with pytest.raises(UserError, match="exceeds the cluster's 2 CPUs"):
        plan_actors(GenerationConfig(num_actors=3), {"CPU": 2}, [2], 10)
    # GPU: auto-detected, one GPU per actor
    assert plan_actors(cfg, {"CPU": 16, "GPU": 4}, [16], 10) == ActorPlan(4, 1.0, 1.0, "cuda", 1)
    assert plan_actors(GenerationConfig(generator="shapes"), {"CPU": 4, "GPU": 1}, [4], 9).device == "cpu"
    with pytest.raises(UserError, match="no GPU"):
        plan_actors(GenerationConfig(use_gpu=True), {"CPU": 2}, [2], 10)
    with pytest.raises(UserError, match="exceeds the cluster's 2 GPU"):
        plan_actors(GenerationConfig(num_actors=3), {"CPU": 8, "GPU": 2}, [8], 10)


# ----------------------------------------------------------------- Ray ------

@pytest.mark.timeout(300)
def test_generates_exact_counts_with_manifest_and_samples(reference):
    path, out = reference["path"], reference["out"]
    assert f"generated {len(EXPECTED_IDS)} images (0 already present)" in out and "images/s" in out
    assert set(reference["images"]) == EXPECTED_IDS
    ds = st.TorchImageDataset(path, split="all")
    assert Counter(ds.labels.tolist()) == {0: PER_CLASS, 1: PER_CLASS, 2: PER_CLASS}
    image, label = ds[0]
    assert image.size == (32, 32) and label == 0
    m = st.load_manifest(path)
    assert m["complete"] and m["class_counts"] == [PER_CLASS] * 3
    assert [s["index"] for s in m["shards"]] == [0, 1, 2, 3] and all(s["sha256"] for s in m["shards"])
    assert m["generator"]["model"] == "tiny" and m["settings"]["steps"] == 2
    assert m["task"]["classnames"] == CLASSES
    assert os.path.isfile(os.path.join(path, st.SAMPLES))
    assert not os.path.exists(os.path.join(path, st.TMP_DIR))
    table = pq.read_table(os.path.join(path, m["shards"][1]["file"]))
    assert table.column("prompt").to_pylist()[0] == "a photo of a red apple."
    assert table.schema.names == st.SCHEMA.names


@pytest.mark.timeout(300)
def test_rerun_is_a_noop(reference, classnames_file, regft_cache):
    path = reference["path"]
    before = {k: os.stat(f).st_mtime_ns for k, f in st.list_shards(path).items()}
    rc, out, err = _run_cli(["--classnames", str(classnames_file), "--store",
                             str(reference["store"]), *ARGS])
    assert rc == 0, err
    assert "nothing to generate" in out and f"dataset: {path}" in out
    # the batch size and actor count are not part of the dataset id
    cfg = _cfg(classnames_file, reference["store"], batch_size=4, num_actors=1)
    assert ensure_dataset(cfg) == path
    assert {k: os.stat(f).st_mtime_ns for k, f in st.list_shards(path).items()} == before


@pytest.mark.timeout(300)
def test_injected_exception_then_rerun_generates_only_the_missing(reference, classnames_file,
                                                                  regft_cache, tmp_path,
                                                                  monkeypatch):
    # one actor (2 torch threads here): shards run in order, so the fault in the last shard
    # comes after earlier shards were committed. PASSIVE OpenMP waiting (forwarded to the actor):
    # spinning 2-thread regions crawl when other jobs share the 2 cores
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    cfg = _cfg(classnames_file, tmp_path / "store", num_actors=1)
    fault = {"item_id": "00002-000003", "mode": "raise", "marker": str(tmp_path / "fired")}
    with pytest.raises(Exception, match="injected fault at item 00002-000003"):
        generate_dataset(cfg, fault=fault)
    path = st.dataset_path(str(tmp_path / "store"), reference["path"].rsplit("/", 1)[1])
    committed = st.list_shards(path)
    assert 3 not in committed and 1 <= len(committed) < 4  # the failing shard (last) is absent
    assert st.load_manifest(path)["complete"] is False
    with pytest.raises(st.DatasetNotReady, match="incomplete"):
        st.TorchImageDataset(path)

    res = generate_dataset(cfg)
    assert res.path == path
    assert res.generated == len(EXPECTED_IDS) - SHARD * len(committed)  # only the missing shards
    resumed = _images_by_id(path)  # raises on a duplicate
    assert_same_images(resumed, reference["images"])  # the exact expected set
    # the shards kept from the interrupted run are untouched
    assert st.list_shards(path).keys() >= committed.keys()


@pytest.mark.timeout(300)
def test_actor_killed_midway_is_replaced_and_its_shard_redone(reference, classnames_file,
                                                              regft_cache, tmp_path):
    cfg = _cfg(classnames_file, tmp_path / "store", num_actors=2)
    marker = tmp_path / "fired"
    fault = {"item_id": "00001-000001", "mode": "exit", "marker": str(marker)}
    res = generate_dataset(cfg, fault=fault)
    assert marker.exists()  # the actor really died (os._exit) during shard 1
    assert res.generated == len(EXPECTED_IDS)
    # same actor shape as the reference (2 x 1 CPU): byte-identical whichever actor ran a shard
    assert _images_by_id(res.path) == reference["images"]
    assert len(st.load_manifest(res.path)["shards"]) == 4


@pytest.mark.timeout(300)
def test_disk_full_mid_shard_leaves_no_partial_shard_and_a_rerun_completes(
        reference, classnames_file, regft_cache, tmp_path, monkeypatch):
    """The store's disk fills while shard 2 is half written (the real write path raises
    OSError(ENOSPC) after writing half the bytes): the job fails, no partial shard is ever
    visible or read, and re-running the same request completes the exact dataset."""
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    cfg = _cfg(classnames_file, tmp_path / "store", num_actors=1)
    fault = {"mode": "disk_full", "shard": 2, "marker": str(tmp_path / "fired")}
    with pytest.raises(OSError, match="ran out of space.*re-run the same command") as info:
        generate_dataset(cfg, fault=fault)
    assert info.value.errno == errno.ENOSPC
    path = st.dataset_path(str(tmp_path / "store"), reference["path"].rsplit("/", 1)[1])
    committed = st.list_shards(path)
    assert 2 not in committed
    for f in committed.values():  # every visible shard is whole (readable, checksummed rows)
        assert pq.read_table(f).num_rows == SHARD
    tmp_dir = os.path.join(path, st.TMP_DIR)
    assert not os.path.isdir(tmp_dir) or os.listdir(tmp_dir) == []  # the partial file was removed
    assert st.load_manifest(path)["complete"] is False
    with pytest.raises(st.DatasetNotReady, match="incomplete"):
        st.read_table(path)

    res = generate_dataset(cfg)
    assert res.generated == len(EXPECTED_IDS) - SHARD * len(committed)
    assert_same_images(_images_by_id(res.path), reference["images"])  # exact set, no duplicate
    assert st.load_manifest(res.path)["complete"] is True


@pytest.mark.timeout(300)
def test_same_seed_same_pixels_across_batch_sizes(reference, classnames_file, regft_cache):
    """Pipeline vs a plain in-process loop at batch size 1: per-image seeds travel with their
    items. Diffusers convs round differently per batch shape (<= 1/255, see test_generators)."""
    import torch

    from regft.generators import make_generator
    from regft.prompts import make_items

    gen = make_generator("tiny", resolution=32, steps=2, guidance=5.0)
    items = make_items("fruit", CLASSES, "a photo of a {}.", PER_CLASS)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the reference's actors (and immune to a busy machine)
    try:
        singles = [gen.generate([it.prompt], [it.seed], [it.label], [it.classname])[0]
                   for it in items]
    finally:
        torch.set_num_threads(threads)
    for it, single in zip(items, singles):
        stored = np.asarray(st.decode_image(reference["images"][it.item_id]))
        diff = np.abs(stored.astype(int) - single)
        assert diff.max() <= 1 and (diff > 0).mean() < 1e-2, it.item_id


@pytest.mark.timeout(300)
def test_shapes_pipeline_is_bit_identical_to_a_plain_loop(ray_local, tmp_path):
    """The pure-numpy generator has no batch-dependent rounding: exact equality end to end."""
    shapes = pytest.importorskip("regft.shapes")
    from regft.prompts import make_items

    cfg = GenerationConfig(task="shapes", generator="shapes", images_per_class=2, shard_size=5,
                           batch_size=3, num_actors=2, store=str(tmp_path), progress=False,
                           generator_options={"gap": 0.5})
    res = generate_dataset(cfg)
    assert res.generated == 2 * len(shapes.TASK_CLASSES)
    images = _images_by_id(res.path)
    gen = shapes.ShapesGenerator(resolution=32, gap=0.5)
    for it in make_items("shapes", list(shapes.TASK_CLASSES), "a photo of a {}.", 2):
        want = gen.generate([it.prompt], [it.seed], [it.label], [it.classname])[0]
        assert np.array_equal(np.asarray(st.decode_image(images[it.item_id])), want)
    assert json.loads(json.dumps(res.manifest["generator"]))["gap"] == 0.5


@pytest.mark.timeout(300)
def test_gpu_requested_on_a_cpu_cluster_fails_before_any_work(ray_local, classnames_file,
                                                              regft_cache, tmp_path):
    rc, out, err = _run_cli(["--classnames", str(classnames_file), "--store", str(tmp_path),
                             "--use-gpu", *ARGS])
    assert rc == 2 and "no GPU" in err and "Traceback" not in err
    assert not any(st.list_shards(str(p)) for p in tmp_path.iterdir() if p.is_dir())


def test_console_hides_rays_internal_lines_unless_verbose(no_local_ray, classnames_file, tmp_path,
                                                         regft_cache):
    """Issue 15, two tiny generations as a user runs them (own process, output to a pipe): Ray's
    core worker (C++, fd 2) warns about the first map actor and Ray Data logs each execution;
    the console hides both and keeps them in the full log; --verbose shows them."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    seen = {}
    for flag in ([], ["--verbose"]):
        proc = subprocess.run(
            [sys.executable, "-m", "regft.generate", "--classnames", str(classnames_file),
             "--store", str(tmp_path / f"store{len(flag)}"), *ARGS, *flag],
            capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        seen[bool(flag)] = proc.stdout + proc.stderr
    for marker in ("core_worker", "Starting execution of Dataset"):
        assert marker not in seen[False] and marker in seen[True], marker
    log = Path(re.search(r"^full log: (.+)$", seen[False], re.M).group(1)).read_text()
    assert "core_worker" in log and "Starting execution of Dataset" in log
    assert "dataset: " in seen[False] and "dataset: " in log
