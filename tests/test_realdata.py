"""Real evaluation splits: layouts, the labels-vs-task check, sealing (regft.realdata)."""
import csv
import json

import numpy as np
import pytest
from PIL import Image

from regft.cli import UserError
from regft.realdata import (
    Audit,
    Sealed,
    SealedSplitError,
    detect_kind,
    has_real_test,
    normalize_name,
    open_real_split,
    read_audit,
)
from regft.tasks import Task

TASK = Task(name="colours", classnames=("red circle", "blue square", "green star"))


def write_png(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, dtype=np.uint8)).save(path)


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "real"
    for k, name in enumerate(["red_circle", "Blue Square", "green-star"]):
        for i in range(2):
            write_png(root / name / f"{i}.png", 40 * k + i)
    return root


def test_names_are_case_underscore_and_hyphen_insensitive():
    assert normalize_name("Blue_Square") == normalize_name("blue-square") == "blue square"


def test_imagefolder(folder):
    ds = open_real_split(TASK, str(folder), "test", transform=lambda im: np.asarray(im)[0, 0, 0])
    assert len(ds) == 6
    assert sorted(ds.labels) == [0, 0, 1, 1, 2, 2]
    for i in range(len(ds)):
        pixel, label = ds[i]
        assert pixel // 40 == label  # folder k holds value 40 k (+ i): the label is the class's
    assert detect_kind(str(folder), TASK)[0] == "imagefolder"


def test_imagefolder_with_a_foreign_class_fails_naming_it(folder):
    write_png(folder / "purple_heart" / "0.png", 1)
    with pytest.raises(UserError, match="purple_heart"):
        open_real_split(TASK, str(folder), "test")


def test_imagefolder_subset_is_allowed(tmp_path):
    write_png(tmp_path / "r" / "red circle" / "a.png", 1)
    write_png(tmp_path / "r" / "green star" / "a.png", 2)
    ds = open_real_split(TASK, f"imagefolder:{tmp_path / 'r'}", "val")
    assert sorted(ds.labels) == [0, 2]


def test_csv_names_and_indices(folder, tmp_path):
    names = tmp_path / "by_name.csv"
    with open(names, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        w.writerow([str(folder / "red_circle" / "0.png"), "Red Circle"])
        w.writerow(["real/green-star/1.png", "green_star"])  # relative to the CSV's folder
    ds = open_real_split(TASK, str(names), "test", transform=lambda im: np.asarray(im)[0, 0, 0])
    assert [ds[i][1] for i in range(2)] == [0, 2] and ds[1][0] == 81

    idx = tmp_path / "by_index.csv"
    idx.write_text(f"{folder / 'Blue Square' / '0.png'},1\n")
    assert open_real_split(TASK, str(idx), "val").labels == [1]

    bad = tmp_path / "bad.csv"
    bad.write_text(f"{folder / 'Blue Square' / '0.png'},3\n")
    with pytest.raises(UserError, match="outside 0..2"):
        open_real_split(TASK, str(bad), "test")
    foreign = tmp_path / "foreign.csv"
    foreign.write_text(f"{folder / 'Blue Square' / '0.png'},blue squares\n")
    with pytest.raises(UserError, match="closest task classes: \\['blue square'\\]"):
        open_real_split(TASK, str(foreign), "test")
    missing = tmp_path / "missing.csv"
    missing.write_text("nowhere.png,red circle\n")
    with pytest.raises(UserError, match="not found"):
        open_real_split(TASK, str(missing), "test")


def test_coop_split_file(folder):
    split = {"train": [], "val": [["red_circle/0.png", 0, "red circle"]],
             "test": [["Blue Square/1.png", 1, "blue square"], ["green-star/0.png", 2, "green star"]]}
    path = folder / "split_zhou_Colours.json"
    path.write_text(json.dumps(split))
    assert open_real_split(TASK, str(path), "test").labels == [1, 2]
    assert open_real_split(TASK, f"coop:{path}", "val").labels == [0]


def test_torchvision_dtd_root(tmp_path):
    """A miniature DTD root in torchvision's layout (dtd/dtd/images + labels/test1.txt)."""
    task = Task(name="dtd", classnames=("banded", "blotchy"), real_test="torchvision:DTD")
    base = tmp_path / "dtd" / "dtd"
    lines = []
    for cls in ("blotchy", "banded"):
        write_png(base / "images" / cls / f"{cls}_0001.jpg", 1)
        lines.append(f"{cls}/{cls}_0001.jpg")
    (base / "labels").mkdir()
    (base / "labels" / "test1.txt").write_text("\n".join(lines) + "\n")
    ds = open_real_split(task, str(tmp_path), "test")
    assert detect_kind(str(tmp_path), task)[0] == "torchvision"
    assert sorted(ds[i][1] for i in range(len(ds))) == [0, 1]
    with pytest.raises(UserError, match="test split only"):
        open_real_split(task, f"torchvision:{tmp_path}", "val")


def test_torchvision_without_official_test_split_asks_for_coop(tmp_path):
    task = Task(name="eurosat", classnames=("a", "b"), real_test="torchvision:EuroSAT")
    (tmp_path / "x").mkdir()
    with pytest.raises(UserError, match="CoOp split"):
        open_real_split(task, str(tmp_path), "test")


def test_missing_path_and_no_reader():
    with pytest.raises(UserError, match="no such file"):
        open_real_split(TASK, "/nonexistent/real", "test")
    assert open_real_split(TASK, None, "test") is None
    assert not has_real_test(TASK, None)


def test_shapes_real_hook():
    from regft.shapes import shapes_task

    task = shapes_task()
    assert has_real_test(task, None)
    ds = open_real_split(task, None, "test")
    assert len(ds) > 0 and set(ds.labels.tolist()) == set(range(task.num_classes))
    with pytest.raises(UserError, match="only the shapes task"):
        open_real_split(TASK, "shapes:real", "test")


def test_sealed_split_cannot_be_read_before_unsealing(tmp_path, folder):
    opened = []
    audit_path = tmp_path / "audit.jsonl"

    def factory():
        opened.append(1)
        return open_real_split(TASK, str(folder), "test")

    sealed = Sealed("real_test", factory, Audit(str(audit_path)))
    with pytest.raises(SealedSplitError):
        _ = sealed.dataset
    assert opened == []
    sealed.unseal()
    assert len(sealed.dataset) == 6 and len(sealed.dataset) == 6
    assert opened == [1]  # opened once, lazily
    assert [e["event"] for e in read_audit(str(audit_path))] == ["blocked_read", "unseal", "open"]
