import pytest

from regft.tasks import TaskError, available_tasks, load_task, resolve_task, task_from_classnames_file

PAPER_TASKS = ["cars", "aircraft", "pets", "flowers", "food101", "dtd", "eurosat",
               "caltech101", "sun397", "ucf101", "imagenet"]
EXPECTED_CLASSES = {"cars": 196, "aircraft": 100, "pets": 37, "flowers": 102, "food101": 101,
                    "dtd": 47, "eurosat": 10, "caltech101": 100, "sun397": 397, "ucf101": 101,
                    "imagenet": 1000}


def test_cars_has_196_distinct_names_in_official_order():
    t = load_task("cars")
    assert t.num_classes == 196 and len(set(t.classnames)) == 196
    # official Stanford Cars label order (devkit class ids 1, 2, 3, ..., 196)
    assert t.classnames[:3] == ("AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Acura TL Sedan 2012")
    assert t.classnames[-1] == "smart fortwo Convertible 2012"
    # generation names are the paper's "Year Make Model" forms, in the same order
    assert t.gen_names[0] == "2000 AM General Hummer SUV"
    assert t.generation_template == "a photo of a {}, a type of car."


@pytest.mark.parametrize("name", PAPER_TASKS)
def test_every_paper_task_loads(name):
    t = load_task(name)
    assert t.num_classes == EXPECTED_CLASSES[name]
    assert len(t.gen_names) == t.num_classes
    assert t.templates and all("{}" in x for x in t.templates)
    texts = t.zeroshot_texts()
    assert len(texts) == t.num_classes and all(texts)
    assert name in available_tasks()


def test_descriptions_used_for_head_when_present():
    t = load_task("pets")
    desc = t.descriptions()
    assert desc is not None and len(desc) == 37 and all(len(d) > 1 for d in desc)
    assert t.zeroshot_texts() == desc
    assert load_task("imagenet").descriptions() is None  # no CuPL file: templates


def test_unknown_task_lists_known():
    with pytest.raises(TaskError, match="unknown task 'carz'.*cars"):
        load_task("carz")


def test_classnames_file(tmp_path):
    p = tmp_path / "birds.txt"
    p.write_text("robin\nblue jay\nsparrow\n\n")
    t = task_from_classnames_file(p)
    assert t.name == "birds" and t.classnames == ("robin", "blue jay", "sparrow")
    assert resolve_task(None, str(p)).classnames == t.classnames


@pytest.mark.parametrize(
    "content,match",
    [
        ("", "no class names"),
        ("\n\n", "no class names"),
        ("robin\n\nsparrow\n", r"blank class name on line\(s\) \[2\]"),
        ("robin\nsparrow\nRobin\n", "duplicate class name.*'Robin' \\(lines 1 and 3\\)"),
        ("robin\n", "at least 2 classes"),
    ],
)
def test_bad_classnames_files(tmp_path, content, match):
    p = tmp_path / "c.txt"
    p.write_text(content)
    with pytest.raises(TaskError, match=match):
        task_from_classnames_file(p)


def test_missing_classnames_file(tmp_path):
    with pytest.raises(TaskError, match="file not found"):
        task_from_classnames_file(tmp_path / "nope.txt")


def test_first_n_classes_subset():
    t = resolve_task("cars", None, max_classes=3)
    assert t.name == "cars-first3" and t.num_classes == 3
    assert t.gen_names == load_task("cars").gen_names[:3]
    assert len(t.zeroshot_texts()) == 3 and t.real_test is None
    assert resolve_task("cars", None, max_classes=500).num_classes == 196
    with pytest.raises(TaskError, match="at least 2"):
        resolve_task("cars", None, max_classes=1)
