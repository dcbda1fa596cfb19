"""Bad inputs to the commands that read what a search produced (regft.predict, regft.evaluate:
exports, MLflow model URIs, images, real test splits) and late failures of a search (unreadable
real-test images, corrupt or foreign search state): each is exit 2 with one short line naming
the flag or file, no traceback, and nothing created in the working directory (issue 19, items
8-12). Tiny data: one export of the random tiny CLIP written once per module (no training), a
sqlite MLflow registry entry pointing at it, a few 32 px images."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from regft import evaluate, predict
from regft import export as ex

pytestmark = pytest.mark.timeout(300)

NAMES = ("red", "green", "blue", "yellow")
COLOURS = ((220, 30, 30), (30, 200, 40), (40, 60, 230), (230, 220, 40))
MESSAGE_CHARS = 500
REGISTERED = "regft-colours"


def _image(path: Path, k: int, size: int = 32) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), COLOURS[k], dtype=np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """An export of the zero-shot tiny CLIP over NAMES (no training: these tests read it, they do
    not judge it), registered as REGISTERED version 1 in a sqlite MLflow store, and a real test
    ImageFolder of NAMES."""
    from mlflow.tracking import MlflowClient

    from regft import engine
    from regft.models import build_classifier, create_clip
    from regft.tasks import Task

    root = tmp_path_factory.mktemp("outputs")
    bundle = create_clip("tiny", None, seed=0)
    model = build_classifier(bundle, Task(name="colours", classnames=NAMES))
    folder = ex.write_export(root / "export", engine.state_dict_cpu(model), model="tiny",
                             pretrained=None, architecture=ex.architecture_of(bundle),
                             classnames=NAMES, alpha=0.5, task={"name": "colours"})
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri, registry_uri=uri)
    run = client.create_run(client.create_experiment("outputs", artifact_location=str(root / "art")))
    client.create_registered_model(REGISTERED)
    client.create_model_version(REGISTERED, source=str(folder), run_id=run.info.run_id)
    real = root / "real"
    for k, name in enumerate(NAMES):
        _image(real / name / "a.png", k)
    return {"folder": folder, "uri": uri, "root": root, "real": real}


@pytest.fixture
def cwd(tmp_path, monkeypatch):
    """An empty working directory: whatever a failed command creates (./mlflow.db, ./regft_runs)
    shows up in it."""
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


def refused(main, argv: list[str], cwd: Path, capsys, *named: str) -> str:
    """Run `main(argv)`; assert exit 2, one short error naming each of `named`, no traceback,
    and nothing created in the working directory. Returns the error text."""
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("error:") or "error:" in err, err
    assert len(err) < MESSAGE_CHARS, err
    assert "Traceback" not in err, err
    for n in named:
        assert n in err, err
    assert sorted(p.name for p in cwd.iterdir()) == [], f"created: {list(cwd.iterdir())}"
    return err


def _copy_export(store, dst: Path, edit=None) -> Path:
    folder = dst / "export"
    shutil.copytree(store["folder"], folder)
    if edit is not None:
        meta_path = folder / ex.META_FILE
        meta = json.loads(meta_path.read_text())
        edit(meta)
        meta_path.write_text(json.dumps(meta))
    return folder


# ------------------------------------------------------------------ predict: MODEL ----

def test_registry_lookups_use_the_given_tracking_uri(store, cwd, capsys):
    """models:/NAME/VERSION is looked up at --tracking-uri (today: in ./mlflow.db, created)."""
    img = _image(cwd.parent / "img" / "red.png", 0)
    rc = predict.main([f"models:/{REGISTERED}/1", str(img), "--tracking-uri", store["uri"],
                       "--json"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert json.loads(out.out.splitlines()[0])["label"] in NAMES
    assert not (cwd / "mlflow.db").exists()
    assert predict.main([f"models:/{REGISTERED}/latest", str(img), "--tracking-uri", store["uri"]]) == 0
    assert list(cwd.iterdir()) == []


@pytest.mark.parametrize("model, named", [
    (f"models:/{REGISTERED}/7", ["no version 7", "versions: 1"]),
    ("models:/regft-nothing/1", ["no registered model", REGISTERED]),
    ("models:/regft-colours", ["models:/NAME/VERSION"]),
    ("0123456789abcdef0123456789abcdef", ["MODEL", "0123456789abcdef"]),
    ("no/such/folder", ["MODEL", "no such folder"]),
])
def test_model_uris_that_do_not_exist(store, cwd, capsys, model, named):
    img = _image(cwd.parent / "img" / "red.png", 0)
    refused(predict.main, [model, str(img), "--tracking-uri", store["uri"]], cwd, capsys, *named)


@pytest.mark.parametrize("given", [True, False], ids=["flag", "default"])
def test_a_sqlite_store_that_does_not_exist_is_not_created(store, cwd, capsys, monkeypatch, given):
    """Reading a model never creates a tracking store (today the default ./mlflow.db appears)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    img = _image(cwd.parent / "img" / "red.png", 0)
    missing = cwd.parent / "elsewhere" / "mlflow.db"
    (cwd.parent / "elsewhere").mkdir()
    argv = [f"models:/{REGISTERED}/1", str(img)] + (["--tracking-uri", f"sqlite:///{missing}"]
                                                     if given else [])
    refused(predict.main, argv, cwd, capsys, "--tracking-uri", "no such database file")
    assert not missing.exists()
    refused(evaluate.main, argv[:1] + argv[2:], cwd, capsys, "--tracking-uri")


def test_a_folder_holding_two_exports_asks_which(store, cwd, capsys):
    both = cwd.parent / "exports"
    for name in ("search-a", "search-b"):
        shutil.copytree(store["folder"], both / name)
    img = _image(cwd.parent / "img" / "red.png", 0)
    refused(predict.main, [str(both), str(img)], cwd, capsys, "2 exports", "search-a", "search-b")


def test_a_file_of_an_export_stands_for_its_folder_and_other_files_are_refused(store, cwd, capsys):
    img = _image(cwd.parent / "img" / "red.png", 0)
    assert predict.main([str(store["folder"] / ex.META_FILE), str(img)]) == 0
    capsys.readouterr()
    other = cwd.parent / "model.pt"
    other.write_bytes(b"\x80\x04not an export")
    refused(predict.main, [str(other), str(img)], cwd, capsys, "model.pt", "not an export folder")


# --------------------------------------------------------- predict: the export's JSON ----

def _set(path: str, value):
    def edit(meta):
        *parents, leaf = path.split(".")
        node = meta
        for k in parents:
            node = node[k]
        node[leaf] = value
    return edit


@pytest.mark.parametrize("edit, named", [
    (_set("open_clip.model_cfg", [1, 2]), "open_clip.model_cfg is list"),
    (_set("open_clip.model_cfg.vision_cfg", "ViT"), "vision_cfg is str"),
    (_set("open_clip.model_cfg.vision_cfg.width", 10 ** 12), "vision_cfg.width"),
    (_set("open_clip.model_cfg.vision_cfg.width", 100_000), "parameters"),
    (_set("open_clip.model_cfg.vision_cfg.layers", float("inf")), "vision_cfg.layers"),
    (_set("open_clip.model_cfg.vision_cfg.patch_size", 0), "cannot build"),
    (_set("open_clip.model_cfg.embed_dim", "64"), "embed_dim"),
    (_set("open_clip.preprocess_cfg.size", "big"), "preprocess_cfg.size"),
    (_set("open_clip.preprocess_cfg.std", [0, 0, 0]), "preprocess_cfg.std"),
    (_set("alpha", float("nan")), "alpha"),
    (_set("classnames", ["red", "red", "blue", "yellow"]), "classnames"),
    (_set("evaluation", {"eval_batch_size": "many"}), "evaluation.eval_batch_size"),
    (_set("task", {"real_test": 3}), "task.real_test"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_wrong_typed_or_absurd_export_json(store, cwd, capsys, edit, named):
    folder = _copy_export(store, cwd.parent, edit)
    img = _image(cwd.parent / "img" / "red.png", 0)
    refused(predict.main, [str(folder), str(img)], cwd, capsys, ex.META_FILE, named)


# ------------------------------------------------------------------ predict: IMAGE ----

def _bomb(path: Path) -> Path:
    """A PNG whose header claims 30,000 x 30,000 pixels (900 M: PIL's decompression-bomb error
    is above 2 x MAX_IMAGE_PIXELS = 179 M), a few hundred bytes on disk."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    side = 30_000
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)  # 8-bit greyscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                     + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("case", ["empty_folder", "not_an_image", "truncated", "bomb"])
def test_images_predict_cannot_read(store, cwd, capsys, case):
    d = cwd.parent / "img"
    d.mkdir()
    if case == "empty_folder":
        (d / "notes.txt").write_text("no images here")
        arg, named = d, "folder has no images"
    elif case == "not_an_image":
        arg = d / "photo.png"
        arg.write_text("this is text")
        named = "photo.png"
    elif case == "truncated":
        full = _image(d / "full.jpg", 1, size=64)
        arg = d / "cut.jpg"
        arg.write_bytes(full.read_bytes()[:200])
        named = "cut.jpg"
    else:
        arg, named = _bomb(d / "bomb.png"), "bomb.png"
    refused(predict.main, [str(store["folder"]), str(arg)], cwd, capsys, named)


# ---------------------------------------------------------------------- evaluate ----

def test_evaluate_device_flag(store, cwd, capsys):
    import torch

    refused(evaluate.main, [str(store["folder"]), "--real-test", str(store["real"]), "--device",
                            "gpu0"], cwd, capsys, "--device", "gpu0")
    refused(evaluate.main, [str(store["folder"]), "--real-test", str(store["real"]), "--device",
                            "meta"], cwd, capsys, "--device")
    if not torch.cuda.is_available():
        refused(evaluate.main, [str(store["folder"]), "--real-test", str(store["real"]),
                                "--device", "cuda"], cwd, capsys, "--device cuda", "no CUDA")
    else:
        refused(evaluate.main, [str(store["folder"]), "--real-test", str(store["real"]), "--device",
                                f"cuda:{torch.cuda.device_count()}"], cwd, capsys, "--device")
    refused(evaluate.main, [str(store["folder"]), "--batch-size", "0"], cwd, capsys, "--batch-size")


def _real_split(tmp: Path, case: str) -> tuple[str, str]:
    """A real test split with one problem: (the --real-test value, what the error must name)."""
    real = tmp / "real"
    for k, name in enumerate(NAMES):
        _image(real / name / "a.png", k)
    if case == "corrupt_image":
        (real / "blue" / "b.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
        return str(real), "b.jpg"
    if case == "truncated_image":
        full = _image(real / "green" / "full.jpg", 1, size=64)
        (real / "green" / "cut.jpg").write_bytes(full.read_bytes()[:300])
        return str(real), "cut.jpg"
    if case == "bomb":
        _bomb(real / "red" / "bomb.png")
        return str(real), "bomb.png"
    coop = real / "split_zhou_colours.json"  # image paths relative to its folder
    good = [[f"{n}/a.png", k, n] for k, n in enumerate(NAMES)]
    content = {
        "coop_not_json": "{'test': [",
        "coop_entry_short": json.dumps({"test": good + [["red/a.png", 0]]}),
        "coop_label_string": json.dumps({"test": good + [["red/a.png", "zero", "red"]]}),
        "coop_list_not_list": json.dumps({"test": {"red/a.png": "red"}}),
        "coop_not_object": json.dumps([good]),
    }[case]
    coop.write_text(content)
    return f"coop:{coop}", coop.name


REAL_CASES = ["corrupt_image", "truncated_image", "bomb", "coop_not_json", "coop_entry_short",
              "coop_label_string", "coop_list_not_list", "coop_not_object"]


@pytest.mark.parametrize("case", REAL_CASES)
def test_evaluate_bad_real_test_splits(store, cwd, capsys, case):
    real_test, named = _real_split(cwd.parent, case)
    refused(evaluate.main, [str(store["folder"]), "--real-test", real_test], cwd, capsys,
            "--real-test", named)


def test_evaluate_reads_a_good_split(store, cwd, capsys):
    rc = evaluate.main([str(store["folder"]), "--real-test", str(store["real"]), "--json"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert json.loads(out.out)["total"] == len(NAMES)


@pytest.mark.parametrize("case", ["corrupt_image", "truncated_image", "bomb", "coop_entry_short"])
def test_real_split_preflight_decodes_every_image(tmp_path, case):
    """The check a search and regft.train run before any work (realdata.real_split_problems)."""
    from regft.realdata import real_split_problems
    from regft.tasks import Task

    real_test, named = _real_split(tmp_path, case)
    problems = real_split_problems(Task(name="colours", classnames=NAMES), real_test, "test")
    assert len(problems) == 1 and named in problems[0] and len(problems[0]) < MESSAGE_CHARS, problems


# ------------------------------------------------ a search: resume and late failures ----

SMOKE = ["shapes", "--preset", "smoke"]


def _fake_search(searches: Path, name: str, *, task: str | None = "shapes",
                 corrupt: str | None = None, age_s: float = 0.0) -> Path:
    """A search's saved state as Tune and regft leave it (the files a restore reads), optionally
    with one file replaced by garbage; its files' times set `age_s` seconds back."""
    import os
    import pickle
    import time

    folder = searches / name
    folder.mkdir(parents=True)
    files = {"tuner.pkl": pickle.dumps({"state": 1}),
             "experiment_state-2026-01-01_00-00-00.json": b'{"trial_data": []}',
             "searcher-state-2026-01-01_00-00-00.pkl": pickle.dumps({"searcher": 1})}
    if task is not None:
        files["regft_search.json"] = json.dumps({"task": task, "classnames": None}).encode()
    if corrupt is not None:
        files[corrupt] = b"\x00garbage{"
    for fname, data in files.items():
        (folder / fname).write_bytes(data)
        t = time.time() - age_s
        os.utime(folder / fname, (t, t))
    return folder


def tune_refused(argv: list[str], tmp: Path, cwd: Path, capsys, *named: str) -> str:
    """regft.tune refuses `argv` (storage and tracking store under `tmp`): exit 2 naming `named`,
    and no MLflow store, dataset or Optuna study was created, nor anything in the cwd."""
    from regft.tune import main

    argv = [*argv, "--storage", str(tmp / "store"), "--tracking-uri", f"sqlite:///{tmp / 'mlflow.db'}"]
    err = refused(main, argv, cwd, capsys, *named)
    assert not (tmp / "mlflow.db").exists()
    for sub in ("datasets", "optuna", "exports"):
        assert not (tmp / "store" / sub).exists(), sub
    return err


@pytest.mark.timeout(180)
@pytest.mark.parametrize("corrupt", ["tuner.pkl", "experiment_state-2026-01-01_00-00-00.json",
                                     "searcher-state-2026-01-01_00-00-00.pkl", "regft_search.json"])
def test_corrupt_search_state_is_reported_before_anything_is_created(tmp_path, cwd, capsys,
                                                                      ray_local, corrupt):
    _fake_search(tmp_path / "store" / "searches", "s1", corrupt=corrupt)
    tune_refused([*SMOKE, "--resume", "--name", "s1"], tmp_path, cwd, capsys, "--resume", corrupt)


@pytest.mark.timeout(180)
def test_resume_of_another_tasks_search_is_refused(tmp_path, cwd, capsys, ray_local):
    """Today it resumes the other task's search and registers its model under this task's name."""
    _fake_search(tmp_path / "store" / "searches", "theirs", task="cars")
    tune_refused([*SMOKE, "--resume", "--name", "theirs"], tmp_path, cwd, capsys,
                 "--resume --name theirs", "'cars'", "'shapes'")


@pytest.mark.timeout(180)
def test_resume_without_name_takes_the_latest_search_by_time(tmp_path, cwd, capsys, ray_local):
    """'shapes-custom-...' sorts before 'shapes-smoke-...' but was written last: it is the one
    resumed (its state is made corrupt here, so the refusal names the search that was picked)."""
    searches = tmp_path / "store" / "searches"
    _fake_search(searches, "shapes-smoke-20990101-000000", age_s=3600)
    _fake_search(searches, "shapes-custom-20000101-000000",
                 corrupt="experiment_state-2026-01-01_00-00-00.json")
    tune_refused([*SMOKE, "--resume"], tmp_path, cwd, capsys, "shapes-custom-20000101-000000")


@pytest.mark.timeout(180)
@pytest.mark.parametrize("case", ["shapes_foreign_classes", "item_list_too_big", "real_test_corrupt",
                                  "bad_flag", "bad_flag_deep_storage"])
def test_search_inputs_that_failed_late_fail_first(tmp_path, cwd, capsys, ray_local, case):
    """Refused before Ray, the MLflow store, the dataset or any folder (today: the shapes
    generator fails its first Ray Data block; a huge --images-per-class is accepted and the item
    list exhausts memory; one bad --real-test image fails every trial's report-only evaluation
    after all trained)."""
    from regft.tune import main

    if case == "shapes_foreign_classes":
        names = tmp_path / "pets.txt"
        names.write_text("dog\ncat\n")
        tune_refused(["pets2", "--classnames", str(names), "--preset", "smoke", "--generator",
                      "shapes"], tmp_path, cwd, capsys, "--generator shapes", "'dog'")
    elif case == "item_list_too_big":
        tune_refused([*SMOKE, "--images-per-class", str(10 ** 12)], tmp_path, cwd, capsys,
                     "--images-per-class", "GiB")
    elif case == "real_test_corrupt":
        real = tmp_path / "real"
        _image(real / "red_circle" / "ok.png", 0)
        (real / "red_circle" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
        tune_refused([*SMOKE, "--real-test", str(real)], tmp_path, cwd, capsys, "--real-test",
                     "broken.png")
    else:  # nothing created by a failed validation, also for a storage folder not there yet
        storage = ["--storage", "deep/er/store"] if case == "bad_flag_deep_storage" else []
        refused(main, [*SMOKE, "--epochs", "0", *storage], cwd, capsys, "--epochs")


@pytest.mark.timeout(120)
def test_train_refuses_a_corrupt_real_test_image_before_generating(tmp_path, cwd, capsys):
    """regft.train checks every real test image before Ray starts or a dataset is generated
    (today it generated the dataset first and failed after)."""
    from regft.train import main

    real = tmp_path / "real"
    _image(real / "red_circle" / "ok.png", 0)
    (real / "red_circle" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    store_dir = tmp_path / "store"
    refused(main, ["shapes", "--store", str(store_dir), "--storage", str(tmp_path / "runs"),
                   "--real-test", str(real)], cwd, capsys, "--real-test", "broken.png")
    assert not (store_dir / "datasets").exists()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", ["shapes_foreign_classes", "item_list_too_big"])
def test_generate_refuses_what_would_fail_only_once_generation_runs(tmp_path, cwd, capsys, case):
    """regft.generate has regft.tune's checks of the request's size and of the shapes
    generator's class names, before Ray starts (today: a failed first block / memory exhausted)."""
    from regft.generate import main

    store_dir = tmp_path / "store"
    if case == "shapes_foreign_classes":
        names = tmp_path / "pets.txt"
        names.write_text("dog\ncat\n")
        argv, named = ["--classnames", str(names), "--generator", "shapes"], ("--generator shapes", "'dog'")
    else:
        argv, named = ["shapes", "--generator", "shapes", "--images-per-class", str(10 ** 12)], (
            "--images-per-class", "GiB")
    refused(main, [*argv, "--store", str(store_dir)], cwd, capsys, *named)
    assert not (store_dir / "datasets").exists()
