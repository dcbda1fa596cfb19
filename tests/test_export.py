"""Export of the ensembled model (regft.export) and its CLIs, on a tiny fine-tuned checkpoint:
same predictions as the in-memory model, safetensors + JSON only, tampering refused."""
from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from regft import export as ex

pytestmark = pytest.mark.timeout(180)

NAMES = ("red", "green", "blue", "yellow")
COLOURS = np.array([[220, 30, 30], [30, 200, 40], [40, 60, 230], [230, 220, 40]], dtype=np.float32)


def colour_images(n_per_class: int, seed: int, size: int = 40) -> tuple[list[np.ndarray], list[int]]:
    """Class k: a noisy square of colour k on grey (40 px, so the 32 px eval crop matters)."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for k in range(len(NAMES)):
        for _ in range(n_per_class):
            img = np.full((size, size, 3), 128, dtype=np.float32)
            x, y = rng.integers(0, size // 2, 2)
            img[y:y + size // 2, x:x + size // 2] = COLOURS[k]
            images.append(np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8))
            labels.append(k)
    return images, labels


FINAL_METRICS = {  # a final report (regft.reports.FinalReport) of a run without a real val split
    "epoch": 1, "best_epoch": 1, "best_alpha": 0.4, "alpha_curve": [[0.0, 0.1], [0.4, 0.3]],
    "selection_metric": "synthetic_val", "alpha_rule": "knee", "select_metric": 0.3, "final": True,
    "zs_synthetic_val_acc": 0.1, "zs_real_test_acc": 0.25, "ft_synthetic_val_acc": 0.2,
    "ft_real_test_acc": 0.25, "ens_synthetic_val_acc": 0.3, "ens_real_test_acc": 0.5}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """theta_0 = zero-shot tiny CLIP, theta_1 = 3 steps of CE + VC, ensembled at alpha 0.4,
    saved as regft.train's final checkpoint and exported from it."""
    from regft import checkpoint, engine
    from regft.ensemble import interpolate
    from regft.models import build_classifier, create_clip
    from regft.reports import CheckpointMeta
    from regft.tasks import Task

    root = tmp_path_factory.mktemp("export")
    bundle = create_clip("tiny", None, seed=0)
    task = Task(name="colours", classnames=NAMES)
    model = build_classifier(bundle, task)
    theta_0 = engine.state_dict_cpu(model)
    tf = engine.split_clip_transform(bundle.preprocess_train)
    images, labels = colour_images(4, seed=0)
    x = engine.normalize_uint8(torch.stack([tf.to_uint8(Image.fromarray(a)) for a in images]),
                               tf.mean, tf.std)
    optimizer = engine.build_optimizer(model, 1e-3)
    for _ in range(3):
        engine.train_step(model, (x, torch.tensor(labels)), optimizer, vc_weight=0.16,
                          vc_cov_ratio=0.125)
    ensemble = interpolate(theta_0, engine.state_dict_cpu(model), 0.4)
    model.load_state_dict(ensemble)
    model.eval()
    ckpt = root / "ckpt"
    ckpt.mkdir()
    meta = CheckpointMeta.from_dict({
        "epoch": 1, "final": True, "alpha": 0.4, "task": "colours", "classnames": list(NAMES),
        "model": "tiny", "pretrained": None, "architecture": ex.architecture_of(bundle),
        "metrics": FINAL_METRICS})
    checkpoint.save(str(ckpt), ensemble, meta)
    folder = ex.export_checkpoint(ckpt, root / "export", dataset_id="ds-123",
                                  task={"name": "colours", "real_test": None},
                                  mlflow={"run_id": "0" * 32}, extra={"trial_id": "t1"})
    return {"bundle": bundle, "model": model, "folder": folder, "root": root, "ckpt": ckpt}


def _reference(trained, images: list[np.ndarray]) -> np.ndarray:
    """Probabilities of the in-memory ensemble through open_clip's own eval transform."""
    pre = trained["bundle"].preprocess_eval
    x = torch.stack([pre(Image.fromarray(a)) for a in images])
    with torch.no_grad():
        return torch.softmax(trained["model"](x), dim=-1).numpy()


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_export_predicts_like_the_in_memory_ensemble(trained, tmp_path):
    images, _ = colour_images(3, seed=5)
    ref = _reference(trained, images)
    for i, a in enumerate(images):
        Image.fromarray(a).save(tmp_path / f"{i}.png")
    # the same images as arrays, PNG bytes and file paths
    inputs = [images[i] if i % 3 == 0 else _png(images[i]) if i % 3 == 1 else str(tmp_path / f"{i}.png")
              for i in range(len(images))]
    pred = ex.load_export(trained["folder"]).predict(inputs, batch_size=5)
    assert pred.indices.tolist() == ref.argmax(axis=1).tolist()
    assert pred.labels == [NAMES[i] for i in ref.argmax(axis=1)]
    np.testing.assert_allclose(pred.probabilities, ref, rtol=0, atol=1e-6)
    assert pred.probabilities.shape == (len(images), 4)


def test_export_is_safetensors_and_json_and_loads_without_unpickling(trained, monkeypatch):
    import pickle

    folder = trained["folder"]
    assert sorted(p.name for p in folder.iterdir()) == [ex.WEIGHTS_FILE, ex.META_FILE]
    meta = json.loads((folder / ex.META_FILE).read_text())
    assert meta["weights_sha256"] == ex.sha256_file(folder / ex.WEIGHTS_FILE)
    assert meta["classnames"] == list(NAMES) and meta["num_classes"] == 4 and meta["embed_dim"] == 64
    assert meta["alpha"] == 0.4 and meta["dataset_id"] == "ds-123" and meta["model"] == "tiny"
    assert meta["mlflow"]["run_id"] == "0" * 32 and meta["trial_id"] == "t1"
    assert meta["open_clip"]["preprocess_cfg"]["size"] == [32, 32]
    assert meta["metrics"]["ens_real_test_acc"] == 0.5 and "alpha_curve" not in meta["metrics"]

    def no_unpickling(*args, **kwargs):
        raise AssertionError("loading an export must not unpickle anything")

    monkeypatch.setattr(torch, "load", no_unpickling)
    monkeypatch.setattr(pickle, "load", no_unpickling)
    monkeypatch.setattr(pickle, "loads", no_unpickling)
    monkeypatch.setattr(pickle, "Unpickler", no_unpickling)
    assert ex.load_export(folder).num_classes == 4


def test_optional_sections_are_typed_and_unknown_keys_refused(trained, tmp_path):
    meta = ex.read_meta(trained["folder"])
    task = ex.section(meta, "task")
    assert task == ex.TaskSection(name="colours", real_test=None)
    assert ex.section(meta, "mlflow").run_id == "0" * 32
    assert ex.section(meta, "evaluation") == ex.EvaluationSection()  # nothing recorded
    assert ex.section({}, "task") == ex.TaskSection()  # an export made outside a search
    with pytest.raises(ex.ExportError, match="section 'mlflow' has unknown keys \\['runid'\\]"):
        ex.section({"mlflow": {"runid": "x"}}, "mlflow")
    copy = tmp_path / "copy"
    shutil.copytree(trained["folder"], copy)
    raw = json.loads((copy / ex.META_FILE).read_text())
    raw["evaluation"] = {"real_tset": "x"}
    (copy / ex.META_FILE).write_text(json.dumps(raw))
    with pytest.raises(ex.ExportError, match="real_tset"):
        ex.read_meta(copy)


def test_export_and_local_predict_import_neither_ray_nor_mlflow(trained):
    code = ("import sys\nfrom regft.export import load_export\nfrom regft.predict import resolve_model\n"
            f"load_export(resolve_model({str(trained['folder'])!r}, None, '/nonexistent'))\n"
            "print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'mlflow'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def _tamper(folder: Path, case: str) -> None:
    from safetensors.torch import load_file, save_file

    meta_path, weights = folder / ex.META_FILE, folder / ex.WEIGHTS_FILE
    meta = json.loads(meta_path.read_text())

    def resave(tensors):  # a consistent file and checksum, but the wrong tensors
        save_file(tensors, str(weights))
        meta["weights_sha256"] = ex.sha256_file(weights)

    if case == "checksum":
        data = bytearray(weights.read_bytes())
        data[-10] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif case == "class_count":
        meta["classnames"], meta["num_classes"] = meta["classnames"][:3], 3
    elif case == "class_names":
        meta["classnames"] = meta["classnames"] + ["purple"]
    elif case == "embedding_size":
        meta["embed_dim"] = 32
    elif case == "head_rows":
        t = load_file(str(weights))
        for key in ("head.linear.weight", "head.linear.bias"):
            t[key] = t[key][:3].contiguous()
        resave(t)
    elif case == "tower_shape":
        t = load_file(str(weights))
        key = next(k for k in t if k.startswith("visual.") and t[k].dim() == 2)
        t[key] = torch.zeros(t[key].shape[0] + 1, t[key].shape[1])
        resave(t)
    elif case == "missing_tensor":
        t = load_file(str(weights))
        t.pop(next(k for k in t if k.startswith("visual.")))
        resave(t)
    elif case == "format":
        meta["format"] = "regft.export/99"
    elif case == "weights_path":
        meta["weights"] = "../model.safetensors"
    elif case == "missing_field":
        del meta["alpha"]
    elif case == "bad_json":
        meta_path.write_text("{not json")
        return
    elif case == "no_json":
        meta_path.unlink()
        return
    meta_path.write_text(json.dumps(meta))


TAMPERED = {
    "checksum": "does not match the recorded",
    "class_count": "class count mismatch",
    "class_names": "5 class names but num_classes 4",
    "embedding_size": "embedding size mismatch",
    "head_rows": "the head has 3 classes but the export names 4",
    "tower_shape": "weights do not fit the recorded architecture",
    "missing_tensor": "missing tensors",
    "format": "this regft reads 'regft.export/1'",
    "weights_path": "must be a file name in the folder",
    "missing_field": "missing 'alpha'",
    "bad_json": "not valid JSON",
    "no_json": "not a regft export",
}


def test_tampered_or_mismatched_exports_are_refused(trained, tmp_path, capsys):
    from regft.evaluate import main as evaluate
    from regft.predict import main as predict

    image = tmp_path / "x.png"
    Image.fromarray(colour_images(1, seed=1)[0][0]).save(image)
    for case, message in TAMPERED.items():
        folder = tmp_path / case
        shutil.copytree(trained["folder"], folder)
        _tamper(folder, case)
        with pytest.raises(ex.ExportError, match=message.replace("(", r"\(").replace("'", ".")):
            ex.load_export(folder)
        # the CLIs: exit 2 and one line naming the problem, no traceback
        assert predict([str(folder), str(image)]) == 2, case
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and "Traceback" not in err, (case, err)
    assert evaluate([str(tmp_path / "checksum"), "--real-test", str(tmp_path)]) == 2
    assert "does not match the recorded" in capsys.readouterr().err


def test_predict_cli_text_json_and_folder_batch(trained, tmp_path, capsys):
    from regft.predict import main as predict

    images, _ = colour_images(2, seed=3)
    (tmp_path / "photos" / "sub").mkdir(parents=True)
    paths = []
    for i, a in enumerate(images):
        p = tmp_path / "photos" / ("sub" if i % 2 else "") / f"{i:02d}.png"
        Image.fromarray(a).save(p)
        paths.append(p)
    (tmp_path / "photos" / "notes.txt").write_text("not an image")
    folder = str(trained["folder"])
    assert predict([folder, str(tmp_path / "photos"), "--json", "--top-k", "2", "--batch-size", "3"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["image"] for r in rows] == sorted(str(p) for p in paths)
    direct = ex.load_export(folder).predict([r["image"] for r in rows])
    assert [r["label"] for r in rows] == direct.labels
    for r, probs in zip(rows, direct.probabilities):
        assert len(r["top_k"]) == 2 and r["top_k"][0]["label"] == r["label"]
        assert r["probability"] == pytest.approx(float(probs.max()), abs=1e-7)
    assert predict([folder, str(paths[0])]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(str(paths[0])) and line.count("(") == 3  # top 3 by default
    # bad input: one line, exit 2
    (tmp_path / "broken.png").write_bytes(b"\x89PNG but not really")
    for argv, message in (([folder, str(tmp_path / "missing.png")], "no such file or folder"),
                          ([folder, str(tmp_path / "broken.png")], "cannot be read as an image"),
                          ([str(tmp_path / "nowhere"), str(paths[0])], "no such folder"),
                          ([folder, str(paths[0]), "--top-k", "0"], "--top-k")):
        assert predict(argv) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err


def test_evaluate_cli_compares_with_the_logged_accuracy(trained, tmp_path, capsys):
    from regft.evaluate import main as evaluate

    images, labels = colour_images(3, seed=9)
    for i, (a, k) in enumerate(zip(images, labels)):
        (tmp_path / "real" / NAMES[k]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(a).save(tmp_path / "real" / NAMES[k] / f"{i}.png")
    real = str(tmp_path / "real")
    expected = float((_reference(trained, images).argmax(axis=1) == np.array(labels)).mean())
    folder = tmp_path / "export"
    shutil.copytree(trained["folder"], folder)
    meta = json.loads((folder / ex.META_FILE).read_text())
    meta["evaluation"] = {"real_test": real, "eval_batch_size": 5}
    meta["metrics"]["ens_real_test_acc"] = expected
    (folder / ex.META_FILE).write_text(json.dumps(meta))
    assert evaluate([str(folder), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["accuracy"] == expected and out["total"] == 12 and out["reproduced"] is True
    # a logged number that the model does not reproduce: exit 1, said in words
    meta["metrics"]["ens_real_test_acc"] = expected - 0.25
    (folder / ex.META_FILE).write_text(json.dumps(meta))
    assert evaluate([str(folder)]) == 1
    assert "DIFFERS" in capsys.readouterr().out
    # no split recorded and none given
    assert evaluate([str(trained["folder"])]) == 2
    assert "give --real-test PATH" in capsys.readouterr().err


def test_export_rebuilds_the_architecture_for_older_checkpoints(trained, tmp_path):
    """A final checkpoint without a recorded architecture is exported all the same."""
    import dataclasses

    from regft import checkpoint
    from regft.reports import EpochReport

    state, meta = checkpoint.load(str(trained["ckpt"]))
    (tmp_path / "ckpt").mkdir()
    checkpoint.save(str(tmp_path / "ckpt"), state, dataclasses.replace(meta, architecture=None))
    assert checkpoint.read_meta(str(tmp_path / "ckpt")).architecture is None
    folder = ex.export_checkpoint(tmp_path / "ckpt", tmp_path / "export")
    images, _ = colour_images(1, seed=2)
    a = ex.load_export(folder).predict(images).probabilities
    b = ex.load_export(trained["folder"]).predict(images).probabilities
    assert np.array_equal(a, b)
    with pytest.raises(ex.ExportError, match="already holds an export"):
        ex.export_checkpoint(tmp_path / "ckpt", folder)
    epoch_report = EpochReport.from_dict({k: 0.5 for k in (
        "train_loss", "ce_loss", "vc_loss", "vc_variance", "vc_covariance", "grad_norm", "lr",
        "images_per_s", "synthetic_val_acc", "div_magnitude", "div_direction", "effective_rank",
        "select_metric")} | {"epoch": 1})
    not_final = dataclasses.replace(meta, final=False, alpha=None, architecture=None,
                                    metrics=epoch_report)
    checkpoint.save(str(tmp_path / "ckpt"), state, not_final)
    with pytest.raises(ex.ExportError, match="not a final"):
        ex.export_checkpoint(tmp_path / "ckpt", tmp_path / "other")


def test_search_keeps_the_export_when_registration_fails(trained, tmp_path, monkeypatch, capsys):
    """deliver_best (the end of regft.tune) with an MLflow registry that fails: a warning, the
    export written and recorded on the parent run, no exception."""
    from types import SimpleNamespace

    from mlflow.tracking import MlflowClient

    from regft import registry
    from regft.tasks import Task

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.create_experiment("regft-colours", artifact_location=str(tmp_path / "artifacts"))
    parent = client.create_run(exp).info.run_id

    def broken(*args, **kwargs):
        raise RuntimeError("registry unavailable")

    monkeypatch.setattr(registry, "log_export", broken)
    results = [SimpleNamespace(metrics={"trial_id": "t1", "checkpoint_path": str(trained["ckpt"])})]
    out = registry.deliver_best(
        results, {"trial_id": "t1"}, client=client, tracking_uri=client.tracking_uri,
        parent_id=parent, search_name="s", trial_run_root=str(tmp_path / "none"),
        export_dir=str(tmp_path / "exports" / "s"), registered_name="regft-colours",
        task=Task(name="colours", classnames=NAMES), dataset_path="/x/ds-1",
        evaluation={"real_test": None})
    assert out == {"export": str(tmp_path / "exports" / "s"), "model_uri": None}
    assert "registering it in MLflow failed" in capsys.readouterr().err
    meta = ex.verify_export(out["export"])
    assert meta["mlflow"]["run_id"] == parent and meta["dataset_id"] == "ds-1"
    assert client.get_run(parent).data.tags["regft.export"] == out["export"]
    # no checkpoint anywhere: a warning, nothing exported, still no exception
    out = registry.deliver_best(
        [], {"trial_id": "t2"}, client=client, tracking_uri=client.tracking_uri, parent_id=parent,
        search_name="s2", trial_run_root=str(tmp_path / "none"),
        export_dir=str(tmp_path / "exports" / "s2"), registered_name="regft-colours",
        task=Task(name="colours", classnames=NAMES), dataset_path="/x/ds-1", evaluation={})
    assert out == {"export": None, "model_uri": None}
    assert "could not export" in capsys.readouterr().err


def test_evaluate_falls_back_to_the_training_eval_batch_size():
    """An export that recorded no eval batch size is evaluated as training evaluated it."""
    from regft.evaluate import UNRECORDED_EVAL_BATCH_SIZE
    from regft.train import TrainConfig

    assert UNRECORDED_EVAL_BATCH_SIZE == TrainConfig().eval_batch_size
