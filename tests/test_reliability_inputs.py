"""Bad inputs a user types (issue 19 items 1-3, 13): class-name files, search-space files and the
numbers of every flag of regft.tune, regft.generate and regft.train.

Each case runs the command line in process (`main(argv)`, no subprocess) in an empty working
folder and checks the contract of docs/RELIABILITY.md's "Bad input" table: exit 2, the flag or
key named, one short message (under MAX_MESSAGE characters even when the input is huge), no
traceback, nothing created (no dataset, search state or MLflow store; not even a folder) and Ray
never started: every one of these is refused before Ray would start, so `raylocal.init` is made to
fail loudly (it is not the code under test; a case that reaches it is a check done too late).
"""
from __future__ import annotations

import argparse
import codecs
import math
import typing
from pathlib import Path

import pytest

from regft import config, generate, raylocal, search_space, train, tune

MAX_MESSAGE = 500
SPACE_OK = "parameters:\n  lr: {distribution: loguniform, low: 1.0e-4, high: 1.0e-3}\n"
# a 400-byte "billion laughs": 9 ** 6 strings once expanded (PyYAML would build it all)
ALIAS_BOMB = ("a: &a [x, x, x, x, x, x, x, x, x]\n"
              + "".join(f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n"
                        for p, c in zip("abcde", "bcdef"))
              + SPACE_OK)
CLIS = {"tune": tune.main, "generate": generate.main, "train": train.main}
PARSERS = {"tune": tune.build_parser, "generate": generate.build_parser, "train": train.build_parser}
# the smallest valid command of each CLI (the offline tiny models, nothing downloaded)
BASE = {
    "tune": ["cars", "--preset", "smoke", "--storage", "store", "--tracking-uri", "sqlite:///mlflow.db"],
    "generate": ["cars", "--generator", "tiny", "--images-per-class", "2", "--steps", "1",
                 "--store", "store"],
    "train": ["cars", "--dataset", "no-such-dataset", "--model", "tiny", "--pretrained", "none",
              "--batch-size", "8", "--storage", "store"],
}


@pytest.fixture
def workdir(tmp_path, monkeypatch, regft_cache):
    """An empty working folder (every default output would land here) where Ray cannot start."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.delenv("REGFT_STORE", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started: the bad input was not refused up front")

    monkeypatch.setattr(raylocal, "init", no_ray)
    return work


def _refused(cli: str, argv: list[str], named: str, capsys, work: Path,
             inputs: tuple[str, ...] = ()) -> str:
    """Run `cli` on `argv` and check the bad-input contract; returns stderr."""
    before = {p.name for p in work.iterdir()}
    rc = CLIS[cli](argv)
    err = capsys.readouterr().err
    assert rc == 2, err[-2000:]
    assert named in err, err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    assert len(err) < MAX_MESSAGE, f"{len(err)} characters: {err[:1000]}"
    assert {p.name for p in work.iterdir()} == before | set(inputs), "something was created"
    return err


def _write(work: Path, name: str, data: str | bytes) -> str:
    path = work / name
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return name


# ------------------------------------------------------------------- numbers ----

def _flags_of_type(cli: str, kinds: tuple) -> list[str]:
    return [a.option_strings[0] for a in PARSERS[cli]()._actions
            if a.option_strings and a.type in kinds]


def test_every_float_flag_goes_through_the_one_number_check():
    """No float flag parses with the plain `float` (which takes 'nan', 'inf' and '1e400')."""
    for cli in CLIS:
        assert not _flags_of_type(cli, (float,)), cli
        assert _flags_of_type(cli, (config.finite_float,)), cli


FLOAT_FLAGS = [(cli, flag) for cli in CLIS for flag in _flags_of_type(cli, (config.finite_float,))]
NOT_FINITE = ["nan", "NaN", "inf", "-inf", "1e400", "", "abc"]


@pytest.mark.parametrize("value", NOT_FINITE)
@pytest.mark.parametrize("cli,flag", FLOAT_FLAGS, ids=[f"{c}{f}" for c, f in FLOAT_FLAGS])
def test_every_float_flag_refuses_what_is_not_a_finite_number(cli, flag, value, workdir, capsys):
    """Today --guidance nan (NaN in the manifest), --cpus-per-worker nan and regft.train
    --vc-weight nan (the regularizer silently off) pass: NaN fails every comparison."""
    _refused(cli, [*BASE[cli], flag, value], f"argument {flag}", capsys, workdir)


INT_FLAGS = [(cli, flag) for cli in CLIS for flag in _flags_of_type(cli, (int,))]


@pytest.mark.parametrize("value", ["", "1.5", "nan", "1e3"])
@pytest.mark.parametrize("cli,flag", INT_FLAGS, ids=[f"{c}{f}" for c, f in INT_FLAGS])
def test_every_int_flag_refuses_what_is_not_an_integer(cli, flag, value, workdir, capsys):
    _refused(cli, [*BASE[cli], flag, value], f"argument {flag}", capsys, workdir)


SEEDS = ["-1", str(config.SEED_MAX + 1), str(2**64), "9" * 40]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("cli", list(CLIS))
def test_seed_outside_what_every_seeded_component_accepts_is_refused(cli, seed, workdir, capsys):
    """numpy's RandomState (Optuna's TPE sampler) takes 0..2**32-1, training uses seed + 1."""
    _refused(cli, [*BASE[cli], "--seed", seed], "--seed", capsys, workdir)


# (id, cli, extra argv, what the message must say: the real flag of that command line)
BAD_VALUES = [
    # the global batch over the workers: divisible, and two images per worker for VC
    ("tune-batch-not-divisible", "tune", ["--batch-size", "9", "--workers-per-trial", "2"],
     "--batch-size 9 does not split evenly over --workers-per-trial 2"),
    ("tune-one-image-per-worker", "tune", ["--batch-size", "2", "--workers-per-trial", "2"],
     "VC needs at least 2"),
    ("tune-batch-of-one", "tune", ["--batch-size", "1"], "VC needs at least 2"),
    ("train-batch-not-divisible", "train", ["--batch-size", "9", "--num-workers", "2"],
     "--batch-size 9 is not divisible by --num-workers 2"),
    ("train-one-image-per-worker", "train", ["--batch-size", "2", "--num-workers", "2"],
     "VC needs at least 2"),
    # zero or negative where it means nothing, each under the flag of the command used
    ("tune-steps-0", "tune", ["--steps", "0"], "--steps: must be > 0"),
    ("generate-steps-0", "generate", ["--steps", "0"], "steps (--steps) must be >= 1"),
    ("tune-gen-batch-0", "tune", ["--gen-batch-size", "0"], "--gen-batch-size: must be > 0"),
    ("generate-batch-0", "generate", ["--batch-size", "0"], "(--batch-size) must be >= 1"),
    ("generate-shard-size-0", "generate", ["--shard-size", "0"], "(--shard-size) must be >= 1"),
    ("generate-output-size-0", "generate", ["--output-size", "0"], "(--output-size) must be >= 1"),
    ("generate-num-actors-0", "generate", ["--num-actors", "0"], "(--num-actors) must be >= 1"),
    ("generate-guidance-negative", "generate", ["--guidance", "-1"], "(--guidance) must be >= 0"),
    ("generate-max-classes-1", "generate", ["--max-classes", "1"], "(--max-classes) must be >= 2"),
    ("tune-cpus-0", "tune", ["--cpus-per-worker", "0"], "--cpus-per-worker: must be > 0"),
    ("tune-gpus-negative", "tune", ["--gpus-per-trial", "-1"], "--gpus-per-trial: must be >= 0"),
    ("tune-guidance-negative", "tune", ["--guidance", "-0.5"], "--guidance: must be >= 0"),
    ("tune-max-classes-0", "tune", ["--max-classes", "0"], "--max-classes: must be > 0"),
    ("tune-warmup-negative", "tune", ["--warmup-steps", "-1"], "--warmup-steps: must be >= 0"),
    ("train-lr-0", "train", ["--lr", "0"], "--lr: must be > 0"),
    ("train-vc-weight-negative", "train", ["--vc-weight", "-0.1"], "--vc-weight: must be >= 0"),
    ("train-cpus-0", "train", ["--cpus-per-worker", "0"], "--cpus-per-worker: must be > 0"),
    ("train-val-fraction-1", "train", ["--val-fraction", "1"], "--val-fraction: must be in (0, 1)"),
    ("train-epochs-0", "train", ["--epochs", "0"], "--epochs: must be > 0"),
    ("train-keep-checkpoints-0", "train", ["--keep-checkpoints", "0"], "--keep-checkpoints: must be > 0"),
    ("train-max-classes-1", "train", ["--max-classes", "1"], "--max-classes: a classifier needs"),
    ("train-max-failures-negative", "train", ["--max-failures", "-1"], "--max-failures: must be >= 0"),
    ("train-alpha-step-0", "train", ["--alpha-step", "0"], "--alpha-step 0.0"),
    # huge: what would fill memory or never end
    ("train-alpha-step-tiny", "train", ["--alpha-step", "1e-9"], "--alpha-step 1e-09: more than 101"),
    ("tune-resolution-huge", "tune", ["--resolution", "65536"], "--resolution must be <= 4096"),
    ("generate-resolution-huge", "generate", ["--resolution", "65536"], "(--resolution) must be <= 4096"),
    ("generate-output-size-huge", "generate", ["--output-size", "100000"], "(--output-size) must be <= 4096"),
    # --gap: only the shapes generator has one
    ("tune-gap-without-shapes", "tune", ["--gap", "0.5"], "--gap: only --generator shapes"),
    ("tune-gap-outside-0-1", "tune", ["--generator", "shapes", "--gap", "1.5"], "--gap: must be in [0, 1]"),
    ("generate-gap-without-shapes", "generate", ["--generator-option", "gap=0.5"],
     "--generator-option gap"),
    ("generate-gap-nan", "generate", ["--generator", "shapes", "--generator-option", "gap=NaN"],
     "gap must be in [0, 1]"),
    # an empty text would read as "not given" and fall back to a default nobody asked for
    ("tune-empty-storage", "tune", ["--storage", ""], "--storage: empty value"),
    ("tune-empty-name", "tune", ["--name", " "], "--name: empty value"),
    ("tune-empty-classnames", "tune", ["--classnames", ""], "--classnames: empty value"),
    ("tune-empty-search-space", "tune", ["--search-space", ""], "--search-space: empty value"),
    ("train-empty-dataset", "train", ["--dataset", ""], "--dataset: empty value"),
    ("train-empty-storage", "train", ["--storage", ""], "--storage: empty value"),
    ("generate-empty-store", "generate", ["--store", ""], "--store: empty value"),
    ("generate-empty-classnames", "generate", ["--classnames", ""], "--classnames: empty value"),
]


@pytest.mark.parametrize("cli,extra,named", [c[1:] for c in BAD_VALUES], ids=[c[0] for c in BAD_VALUES])
def test_bad_number_or_value_is_refused_naming_the_flag_of_that_command(cli, extra, named, workdir,
                                                                        capsys):
    _refused(cli, [*BASE[cli], *extra], named, capsys, workdir)


def test_generation_fields_are_named_by_the_flags_of_the_command_in_use():
    """regft.generate's --batch-size is tune's --gen-batch-size (tune's --batch-size is the
    training batch): GenerationConfig.validate names fields the way the caller says."""
    cfg = generate.GenerationConfig(task="cars", batch_size=0, num_actors=0, shard_size=0)
    assert any("(--batch-size)" in p for p in cfg.validate())
    named = cfg.validate(tune._label("generation"))
    assert any(p.startswith("--gen-batch-size") for p in named)
    assert any(p.startswith("--gen-actors") for p in named)
    assert any(p.startswith("generation.shard_size (preset key)") for p in named)  # no tune flag
    assert not any("--batch-size" in p or "--num-actors" in p for p in named)


def test_float_fields_refuse_non_finite_values_from_presets_and_code():
    """The other way in: a preset's `.nan` and a config built in code."""
    with pytest.raises(config.UserError, match="train.vc_weight: expected a finite number"):
        config.from_dict(train.TrainConfig, {"task": "cars", "vc_weight": math.nan}, where="p.yaml: train")
    assert any("vc_weight: must be a finite number" in p
               for p in train.TrainConfig(task="cars", vc_weight=math.nan).validate())
    assert any("guidance (--guidance) must be a finite number" in p
               for p in generate.GenerationConfig(task="cars", guidance=math.inf).validate())


# ----------------------------------------------------------- class-name files ----

CLASSNAME_FILES = [
    # (id, bytes, what the message must say)
    ("latin1", "robin\ncaf\xe9\n".encode("latin-1"), "line 2 is not UTF-8"),
    ("utf16", "robin\nsparrow\n".encode("utf-16"), "UTF-16 text, not UTF-8"),
    ("utf16-no-bom", "robin\nsparrow\n".encode("utf-16-le"), "NUL character"),
    ("nul", b"robin\nspar\x00row\n", "line 2 holds a NUL"),
    ("bell", b"robin\nspar\x07row\n", "line(s) 2 (U+0007)"),
    ("escape", b"robin\n\x1b[31msparrow\n", "U+001B"),
    ("form-feed", b"robin\x0csparrow\nfinch\n", "U+000C"),
    ("zero-width-space", "robin\nrob\u200bin\n".encode(), "U+200B"),
    ("bidi-override", "robin\n\u202esparrow\n".encode(), "U+202E"),
    ("line-separator", "robin\u2028sparrow\nfinch\n".encode(), "U+2028"),
    ("nfc-duplicate", "cafe\u0301\ncaf\u00e9\n".encode(), "duplicate class name(s) 'café' (lines 1 and 2)"),
    ("whitespace-duplicate", b"red  car\n Red car\t\n", "duplicate class name(s) 'Red car'"),
    ("casefold-duplicate", "Stra\u00dfe\nSTRASSE\n".encode(), "(lines 1 and 2)"),
    ("fullwidth-duplicate", "robin\n\uff52\uff4f\uff42\uff49\uff4e\n".encode(), "(lines 1 and 2)"),
    ("crlf-blank-line", b"robin\r\n\r\nsparrow\r\n", "blank class name on line(s) [2]"),
    ("name-too-long", b"robin\n" + b"x" * 100_000 + b"\n", "longer than 300 characters"),
    ("one-class", "\ufeffrobin\n".encode(), "at least 2 classes"),
    ("too-large", b"a\n" * (3 * 2**20), "is it the right file?"),
]


@pytest.mark.parametrize("cli", list(CLIS))
@pytest.mark.parametrize("data,named", [c[1:] for c in CLASSNAME_FILES], ids=[c[0] for c in CLASSNAME_FILES])
def test_bad_classnames_file_is_refused_naming_the_flag(cli, data, named, workdir, capsys):
    name = _write(workdir, "birds.txt", data)
    argv = ["birds", "--classnames", name, *BASE[cli][1:]]
    err = _refused(cli, argv, named, capsys, workdir, inputs=(name,))
    assert "--classnames" in err


def test_classnames_file_with_bom_crlf_or_cr_reads_the_same_names(workdir):
    from regft.tasks import task_from_classnames_file

    want = ("robin", "blue jay", "café")
    for data in ("robin\nblue jay\ncafé\n".encode(), "\ufeffrobin\r\nblue  jay\r\ncafe\u0301\r\n".encode(),
                 b"robin\rblue jay\rcaf\xc3\xa9"):
        assert task_from_classnames_file(workdir / _write(workdir, "c.txt", data)).classnames == want


def test_classnames_folder_or_unreadable_file_names_the_flag(workdir, capsys):
    (workdir / "folder").mkdir()
    _refused("tune", ["birds", "--classnames", "folder", *BASE["tune"][1:]],
             "--classnames 'folder': not a file", capsys, workdir, inputs=("folder",))


# ---------------------------------------------------------- search-space files ----

SPACES = [
    # (id, file content, what the message must say)
    ("alias-bomb", ALIAS_BOMB, "anchors and aliases"),
    ("anchor-only", "parameters: &p\n  lr: {distribution: loguniform, low: 1.0e-4, high: 1.0e-3}\n",
     "anchors and aliases"),
    ("merge-key", "base: &b {distribution: uniform, low: 0, high: 1}\nparameters:\n  vc_weight: {<<: *b}\n",
     "anchors and aliases"),
    ("duplicate-parameter", SPACE_OK + "  lr: {distribution: loguniform, low: 1.0e-5, high: 1.0e-3}\n",
     "key 'lr' given twice (lines 2 and 3)"),
    ("duplicate-bound", "parameters:\n  lr: {distribution: loguniform, low: 1.0e-4, low: 1.0e-5, high: 1}\n",
     "key 'low' given twice"),
    ("duplicate-top-level", SPACE_OK + "alpha: {step: 0.5}\nalpha: {step: 0.25}\n",
     "key 'alpha' given twice"),
    ("strings-for-lr", "parameters:\n  lr: {distribution: choice, values: [fast, slow]}\n",
     "parameters.lr.values: lr takes finite numbers"),
    ("bools-for-lr", "parameters:\n  lr: {distribution: choice, values: [true, false]}\n",
     "parameters.lr.values"),
    ("float-for-int-field", "parameters:\n  warmup_steps: {distribution: choice, values: [10, 2.5]}\n",
     "warmup_steps is an integer setting"),
    ("uniform-for-int-field", "parameters:\n  warmup_steps: {distribution: uniform, low: 0, high: 100}\n",
     "use distribution int or logint"),
    ("fractional-int-step",
     "parameters:\n  warmup_steps: {distribution: int, low: 0, high: 100, step: 0.5}\n",
     "parameters.warmup_steps.step"),
    ("model", "parameters:\n  model: {distribution: choice, values: [ViT-B-16, ViT-L-14]}\n",
     "parameters.model: model cannot be searched"),
    ("use-gpu", "parameters:\n  use_gpu: {distribution: choice, values: [true, false]}\n",
     "parameters.use_gpu: use_gpu cannot be searched"),
    ("epochs", "parameters:\n  epochs: {distribution: int, low: 1, high: 10}\n",
     "parameters.epochs: epochs cannot be searched"),
    ("batch-size", "parameters:\n  batch_size: {distribution: choice, values: [8, 16]}\n",
     "parameters.batch_size: batch_size cannot be searched"),
    ("precision", "parameters:\n  precision: {distribution: choice, values: [fp32]}\n",
     "parameters.precision: precision cannot be searched"),
    ("alpha-tiny-step", SPACE_OK + "alpha: {low: 0.0, high: 1.0, step: 1.0e-9}\n", "more than 101"),
    ("nan-bound", "parameters:\n  lr: {distribution: loguniform, low: .nan, high: 1.0e-3}\n",
     "parameters.lr.low: expected a finite number"),
    ("inf-bound", "parameters:\n  vc_weight: {distribution: uniform, low: 0, high: .inf}\n",
     "parameters.vc_weight.high: expected a finite number"),
    ("int-too-large-for-a-float", "parameters:\n  vc_weight: {distribution: uniform, low: 0, high: "
     + "9" * 400 + "}\n", "parameters.vc_weight.high"),
    ("huge-value-quoted-short", "parameters:\n  lr: {distribution: choice, values: ["
     + ", ".join(["x" * 1000] * 50) + "]}\n", "parameters.lr.values"),
    ("huge-unknown-key-quoted-short", SPACE_OK + "x" * 1000 + ": 1\n", "unknown top-level key"),
    ("step-on-log-range",
     "parameters:\n  lr: {distribution: loguniform, low: 1.0e-4, high: 1.0e-3, step: 1.0e-4}\n",
     "only uniform and int ranges take a step"),
    ("values-on-a-range",
     "parameters:\n  lr: {distribution: loguniform, low: 1.0e-4, high: 1.0e-3, values: [1]}\n",
     "'values' is for a choice"),
    ("python-tag", "parameters: !!python/object/apply:os.system [echo hi]\n", "malformed YAML"),
    ("two-documents", SPACE_OK + "---\n" + SPACE_OK, "malformed YAML"),
    ("empty-file", "", "expected a mapping with 'parameters'"),
    ("latin1", (SPACE_OK + "# caf\xe9\n").encode("latin-1"), "line 3 is not UTF-8"),
    ("utf16", SPACE_OK.encode("utf-16"), "UTF-16 text, not UTF-8"),
    ("nul", SPACE_OK.encode() + b"\x00", "NUL character"),
    ("too-large", SPACE_OK + "#" * (search_space.MAX_SPACE_BYTES + 1) + "\n", "is it the right file?"),
    ("why-not-text", "parameters:\n  lr: {distribution: loguniform, low: 1.0e-4, high: 1.0e-3, why: [1]}\n",
     "parameters.lr.why: expected text"),
]


@pytest.mark.parametrize("data,named", [c[1:] for c in SPACES], ids=[c[0] for c in SPACES])
def test_bad_search_space_file_is_refused_naming_the_flag_and_key(data, named, workdir, capsys):
    name = _write(workdir, "space.yaml", data)
    err = _refused("tune", [*BASE["tune"], "--search-space", name], named, capsys, workdir, inputs=(name,))
    assert "--search-space 'space.yaml'" in err


def test_a_search_space_with_a_bom_and_crlf_loads(workdir):
    name = _write(workdir, "space.yaml", codecs.BOM_UTF8 + SPACE_OK.replace("\n", "\r\n").encode())
    assert set(search_space.load_search_space(workdir / name).parameters) == {"lr"}


def test_searchable_settings_have_the_training_configs_types():
    """SEARCHABLE is the list a search space may sample: each is a TrainConfig field of that type."""
    hints = typing.get_type_hints(train.TrainConfig)
    for name, kind in search_space.SEARCHABLE.items():
        assert hints[name] is kind, name
    assert set(search_space.NOT_SEARCHED) <= set(hints)


def test_parsers_print_a_one_line_usage_on_errors():
    for cli, build in PARSERS.items():
        parser: argparse.ArgumentParser = build()
        assert "\n" not in parser.format_usage().strip(), cli
