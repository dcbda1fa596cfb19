from pathlib import Path

import pytest

from regft.cli import UserError
from regft.search_space import (
    default_search_space_path,
    load_search_space,
    parse_search_space,
    shipped_search_space_dir,
)

ROOT = Path(__file__).resolve().parents[1]


def test_every_shipped_file_loads_and_opens_with_its_command():
    files = sorted((ROOT / "regft" / "search_spaces").glob("*.yaml"))
    # a task has its own file only where its ranges differ from default.yaml (issue 13)
    assert {f.name for f in files} >= {"default.yaml", "shapes.yaml"}
    assert shipped_search_space_dir() == ROOT / "regft" / "search_spaces"
    for f in files:
        space = load_search_space(f)
        assert {"lr", "vc_weight"} <= set(space.parameters), f
        assert all(d.why for d in space.parameters.values()), f"{f}: every dimension needs a reason"
        assert space.alpha.values()[0] >= 0 and space.alpha.values()[-1] <= 1
        first = f.read_text().splitlines()[:4]
        assert any("python -m regft.tune" in line for line in first), f


def test_valid_space_converts_to_tune_domains():
    space = parse_search_space({
        "parameters": {
            "lr": {"distribution": "loguniform", "low": 1e-5, "high": 1e-3},
            "vc_weight": {"distribution": "uniform", "low": 0, "high": 1},
            "vc_cov_ratio": {"distribution": "choice", "values": [0.125, 0.5]},
            "warmup_steps": {"distribution": "int", "low": 1, "high": 3},
        },
        "alpha": {"low": 0.2, "high": 0.8, "step": 0.2},
    })
    domains = space.to_tune()
    assert set(domains) == {"lr", "vc_weight", "vc_cov_ratio", "warmup_steps"}
    assert domains["lr"].lower == 1e-5 and domains["vc_cov_ratio"].categories == [0.125, 0.5]
    assert space.alpha.values() == [0.2, 0.4, 0.6, 0.8]


def test_every_problem_reported_at_once():
    bad = {
        "parameters": {
            "lr": {"distribution": "loguniform", "low": 0.0, "high": 1e-3},
            "vc_weight": {"distribution": "uniform", "low": -0.5, "high": 1.0, "colour": 1},
            "warmup_steps": {"distribution": "int", "low": 10, "high": 5},
            "mystery": {"distribution": "gaussian"},
        },
        "alpha": {"low": -0.1, "high": 1.5},
        "extra": 1,
    }
    with pytest.raises(UserError) as e:
        parse_search_space(bad, where="s.yaml", known_fields={"lr", "vc_weight", "warmup_steps"})
    msg = str(e.value)
    for part in [
        "unknown top-level key 'extra'",
        "parameters.lr: a log-scale range needs low > 0",
        "parameters.vc_weight: unknown key 'colour'",
        "parameters.vc_weight: vc_weight must be >= 0",
        "parameters.warmup_steps: low (10) must be < high (5)",
        "parameters.mystery: not a training or generation setting",
        "parameters.mystery.distribution: 'gaussian'",
        "alpha: alpha must lie in [0, 1]",
    ]:
        assert part in msg, part
    assert "parameters.lr: lr must be > 0" in msg
    assert len(e.value.problems) == 9


def test_alpha_declared_as_sampled_parameter_is_an_error():
    with pytest.raises(UserError, match="alpha is swept per trial"):
        parse_search_space({"parameters": {"alpha": {"distribution": "uniform", "low": 0, "high": 1}}})


def test_malformed_yaml_and_missing_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("parameters:\n  lr: {distribution: loguniform, low: 1e-5\n")
    with pytest.raises(UserError, match="malformed YAML"):
        load_search_space(p)
    with pytest.raises(UserError, match="file not found"):
        load_search_space(tmp_path / "none.yaml")
    p.write_text("- just a list\n")
    with pytest.raises(UserError, match="expected a mapping"):
        load_search_space(p)


def test_a_task_without_its_own_file_gets_default_yaml():
    d = shipped_search_space_dir()
    assert default_search_space_path("cars") == d / "default.yaml"
    assert default_search_space_path("my_task") == d / "default.yaml"
    assert default_search_space_path("shapes") == d / "shapes.yaml"
    assert default_search_space_path("shapes") != default_search_space_path("cars")


def test_generation_settings_are_searched_as_choices_of_their_type():
    """Issue 14: guidance, images_per_class, gen_steps, scheduler and generator may be searched,
    each as a choice (one dataset per value); every wrong one is reported at once."""
    bad = {"parameters": {
        "lr": {"distribution": "loguniform", "low": 1e-5, "high": 1e-3},
        "guidance": {"distribution": "uniform", "low": 1.0, "high": 10.0},
        "images_per_class": {"distribution": "choice", "values": [0, 2.5]},
        "gen_steps": {"distribution": "choice", "values": [2, 2]},
        "scheduler": {"distribution": "choice", "values": [""]},
        "generator": {"distribution": "choice", "values": [1]},
    }}
    with pytest.raises(UserError) as e:
        parse_search_space(bad, where="s.yaml")
    msg = str(e.value)
    for part in ["parameters.guidance: guidance is a generation setting",
                 "parameters.images_per_class.values: images_per_class takes whole numbers >= 1",
                 "parameters.gen_steps.values: a value is listed twice",
                 "parameters.scheduler.values: scheduler takes non-empty names",
                 "parameters.generator.values: generator takes non-empty names"]:
        assert part in msg, part
    assert len(e.value.problems) == 5
    space = parse_search_space({"parameters": {
        "lr": {"distribution": "loguniform", "low": 1e-5, "high": 1e-3},
        "guidance": {"distribution": "choice", "values": [1.0, 7.5]},
        "images_per_class": {"distribution": "choice", "values": [32, 64]},
        "generator": {"distribution": "choice", "values": ["tiny", "tiny-sdxl"]}}})
    assert space.to_tune()["images_per_class"].categories == [32, 64]
    requests = space.generation_requests()
    assert len(requests) == 8 and [r["images_per_class"] for r in requests[:4]] == [64] * 4
    assert {frozenset(r) for r in requests} == {frozenset({"guidance", "images_per_class", "generator"})}


def test_a_space_of_too_many_datasets_is_refused():
    from regft.search_space import MAX_DATASETS

    values = list(range(1, 10))  # 9 x 9 = 81 guidance x steps combinations
    with pytest.raises(UserError, match=f"81 distinct datasets .* more than {MAX_DATASETS}"):
        parse_search_space({"parameters": {
            "guidance": {"distribution": "choice", "values": values},
            "gen_steps": {"distribution": "choice", "values": values},
            "images_per_class": {"distribution": "choice", "values": [8, 16]}}})


def test_shipped_generation_space_varies_the_images_per_class():
    space = load_search_space(ROOT / "regft" / "search_spaces" / "shapes-data.yaml")
    assert space.generation_choices() == {"images_per_class": (100, 50)}
