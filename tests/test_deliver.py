"""Issue 8 end to end, on the session's one shapes smoke search (conftest `shapes_smoke`, the
README quickstart with one trial): the search exports its best model, logs it to the parent
MLflow run and registers it; the export, the registered pyfunc model and the CLIs agree with
each other, with the in-memory ensemble and with the logged accuracy."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.timeout(900)  # the first to ask builds the shared search


@pytest.fixture(scope="module")
def search(shapes_smoke):
    """What the delivery tests read of the shared smoke search."""
    from mlflow.tracking import MlflowClient

    assert shapes_smoke["rc"] == 0, shapes_smoke["out"][-3000:]
    uri = shapes_smoke["tracking_uri"]
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(shapes_smoke["experiment"])
    (parent,) = [r for r in client.search_runs([exp.experiment_id])
                 if r.data.tags.get("regft.role") == "search"]
    store = shapes_smoke["storage"]
    return {"uri": uri, "client": client, "parent": parent, "store": store, "real": "shapes:real",
            "export": store / "exports" / shapes_smoke["search"], "argv": shapes_smoke["argv"]}


def _images(n_per_class: int = 2):
    from regft.shapes import render_real_test

    imgs, _ = render_real_test(n_per_class)
    return list(imgs)


def test_search_exports_logs_and_registers_its_best_model(search):
    from regft.export import META_FILE, WEIGHTS_FILE, read_meta

    folder, parent = search["export"], search["parent"]
    assert sorted(p.name for p in folder.iterdir()) == sorted([META_FILE, WEIGHTS_FILE])
    meta = read_meta(folder)
    assert meta["mlflow"]["run_id"] == parent.info.run_id
    assert meta["dataset_id"] == parent.data.params["dataset_id"]
    assert meta["alpha"] == float(parent.data.params["best/alpha"])
    assert meta["trial_id"] == parent.data.params["best/trial_id"]
    assert meta["num_classes"] == 16 and meta["classnames"][0] == "red circle"
    assert meta["evaluation"]["real_test"] == search["real"]
    assert parent.data.tags["regft.model_uri"] == "models:/regft-shapes/1"
    arts = {a.path for a in search["client"].list_artifacts(parent.info.run_id, "regft_model")}
    assert arts == {f"regft_model/{META_FILE}", f"regft_model/{WEIGHTS_FILE}"}
    version = search["client"].get_model_version("regft-shapes", "1")
    assert version.run_id == parent.info.run_id


def test_export_predicts_like_the_in_memory_ensemble(search):
    """The final checkpoint's weights in a model built the training way (create_clip +
    build_classifier) give the export's labels and probabilities."""
    import torch

    from regft.checkpoint import load as load_checkpoint
    from regft.engine import normalize_uint8, split_clip_transform
    from regft.export import load_export
    from regft.models import build_classifier, create_clip
    from regft.shapes import shapes_task

    finals = [p.parent for p in (search["store"] / "train").rglob("meta.json")
              if json.loads(p.read_text()).get("final")]
    state, meta = load_checkpoint(str(finals[0]))
    bundle = create_clip(meta.model, meta.pretrained)
    module = build_classifier(bundle, shapes_task()).eval()
    module.load_state_dict(state)
    tf = split_clip_transform(bundle.preprocess_eval)
    exported = load_export(search["export"])
    images = _images()
    from PIL import Image

    x = torch.stack([tf.to_uint8(Image.fromarray(a)) for a in images])
    with torch.no_grad():
        ref = torch.softmax(module(normalize_uint8(x, tf.mean, tf.std)), dim=-1).numpy()
    pred = exported.predict(images)
    assert pred.indices.tolist() == ref.argmax(axis=1).tolist()
    np.testing.assert_allclose(pred.probabilities, ref, rtol=0, atol=1e-6)
    assert meta.alpha == exported.meta["alpha"]
    assert meta.architecture == exported.meta["open_clip"]  # recorded by the worker, not rebuilt


def test_mlflow_pyfunc_and_export_folder_give_identical_outputs(search, tmp_path, capsys):
    import mlflow

    from regft.export import load_export
    from regft.predict import main as predict

    images = _images()
    mlflow.set_tracking_uri(search["uri"])
    pyfunc = mlflow.pyfunc.load_model("models:/regft-shapes/1")
    frame = pyfunc.predict(images)
    direct = load_export(search["export"]).predict(images)
    assert frame["label"].tolist() == direct.labels
    assert np.array_equal(np.array(frame["probabilities"].tolist()), direct.probabilities.astype(np.float64))

    # the CLI: the same output from the folder, the run id and the registry
    from PIL import Image

    for i, a in enumerate(images[:3]):
        Image.fromarray(a).save(tmp_path / f"{i}.png")
    outputs = []
    for model in (str(search["export"]), search["parent"].info.run_id, "models:/regft-shapes/1"):
        assert predict([model, str(tmp_path), "--json", "--tracking-uri", search["uri"]]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] == outputs[2]
    rows = [json.loads(line) for line in outputs[0].splitlines()]
    assert [r["label"] for r in rows] == direct.labels[:3]


def test_evaluate_reproduces_the_logged_accuracy(search, capsys):
    from regft.evaluate import main as evaluate

    parent = search["parent"]
    logged = parent.data.metrics["best/ens_real_test_acc"]
    assert evaluate([str(search["export"]), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["real_test"] == search["real"] and out["total"] == 1600
    assert out["accuracy"] == logged and out["reproduced"] is True
    # the same through the registry, in words
    assert evaluate(["models:/regft-shapes/1", "--tracking-uri", search["uri"]]) == 0
    assert "reproduced exactly" in capsys.readouterr().out


def test_the_same_images_from_a_folder_give_the_same_accuracy(search, tmp_path, capsys):
    """The real split written as an ImageFolder (PNG, lossless) and read back through the
    folder reader scores exactly what the in-memory render scored: decoding changes nothing."""
    from regft.evaluate import main as evaluate
    from regft.shapes import write_real_test

    folder = write_real_test(str(tmp_path / "real"))
    assert evaluate([str(search["export"]), "--real-test", folder, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["total"] == 1600 and out["reproduced"] is None  # another split: nothing to compare
    assert out["accuracy"] == search["parent"].data.metrics["best/ens_real_test_acc"]


def test_resume_of_a_finished_search_keeps_one_export_and_version(search, tmp_path, capsys):
    from regft.tune import main

    # its own audit log: the smoke tests read the first run's
    rc = main([*search["argv"], "--resume", "--audit-log", str(tmp_path / "audit.jsonl")])
    assert rc == 0
    assert "models:/regft-shapes/1" in capsys.readouterr().out
    versions = search["client"].search_model_versions("name='regft-shapes'")
    assert len(versions) == 1
    assert Path(search["export"], "regft_model.json").is_file()
