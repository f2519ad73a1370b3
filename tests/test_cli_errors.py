"""Every experiment CLI and benchmark refuses bad input with one message and exit code 2, before any
output is written and, where the check needs no model, before anything is trained; ``--smoke`` keeps
explicit options; a model that does not fit the dataset is refused; the run log survives a torn line."""

import importlib
import json
import os
import sys

import pytest

from experiments import common
from experiments.common import cli

EXPERIMENTS = ["nes_vs_output_noise", "attack_zoo", "decision_attacks", "defense_comparison", "theory_vs_measurement",
               "foreign_model"]
# The cheapest valid options of each experiment (so only the option under test is wrong).
CHEAP = {"attack_zoo": ["--attacks", "nes"], "decision_attacks": ["--attacks", "rays"]}


def _exits_2(main, argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        cli(main, argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err
    return err


def _cache(name, tmp_path) -> list[str]:
    """``--cache-dir`` in a fresh folder (that stays absent unless something is trained); foreign_model trains
    a scikit-learn model and keeps no cache."""
    return [] if name == "foreign_model" else ["--cache-dir", str(tmp_path / "c")]


def _module(name):
    return importlib.import_module(f"experiments.{name}")


def _unwritable(tmp_path):
    """A folder this process cannot write in, even as root (a read-only /proc), else a 0o500 folder."""
    if sys.platform.startswith("linux") and os.path.isdir("/proc"):
        return "/proc/rnd_jax_out"
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o500)
    return str(d / "out")


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_out_that_is_a_file_exits_2_before_any_work(name, tmp_path, capsys):
    f = tmp_path / "a_file"
    f.write_text("keep me")
    err = _exits_2(_module(name).main, CHEAP.get(name, []) + ["--out", str(f), *_cache(name, tmp_path),
                                                             "--no-progress"], capsys)
    assert "is a file" in err and "--out" in err
    assert f.read_text() == "keep me" and not (tmp_path / "c").exists()  # nothing trained


@pytest.mark.parametrize("name", ["nes_vs_output_noise", "theory_vs_measurement"])
@pytest.mark.parametrize("kind", ["under_a_file", "unwritable"])
def test_out_that_cannot_be_created_exits_2(name, kind, tmp_path, capsys):
    if kind == "under_a_file":
        (tmp_path / "f").write_text("")
        out = str(tmp_path / "f" / "sub")
    else:
        out = _unwritable(tmp_path)
    err = _exits_2(_module(name).main, ["--out", out, "--cache-dir", str(tmp_path / "c"), "--no-progress"], capsys)
    assert repr(out) in err
    assert not os.path.exists(out) and not (tmp_path / "c").exists()


def test_check_out_creates_nothing(tmp_path):
    out = tmp_path / "a" / "b" / "c"
    assert common.check_out(out) == out
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name,argv", [
    ("nes_vs_output_noise", ["--max-queries", "50"]),  # NES: 50 samples + the check of the current point
    ("attack_zoo", ["--attacks", "nes", "--max-queries", "50"]),
    ("decision_attacks", ["--attacks", "hsja", "--max-queries", "100", "--checkpoints", "100"]),
    ("defense_comparison", ["--budgets", "20"]),
    ("foreign_model", ["--attacks", "hsja", "--budget", "100"]),
])
def test_budget_below_one_step_exits_2_before_training(name, argv, tmp_path, capsys):
    err = _exits_2(_module(name).main, argv + ["--out", str(tmp_path / "o"), *_cache(name, tmp_path),
                                               "--no-progress"], capsys)
    assert "smaller than one step" in err
    assert not (tmp_path / "o").exists() and not (tmp_path / "c").exists()


@pytest.mark.parametrize("name,argv,message", [
    ("nes_vs_output_noise", ["--n-images", "360"], "correctly classified"),
    ("attack_zoo", ["--attacks", "nes", "--n-images", "360"], "correctly classified"),
    ("theory_vs_measurement", ["--n-images", "361"], "has only 360 images"),
])
def test_too_many_images_for_the_pool_exits_2_and_writes_nothing(name, argv, message, tmp_path, capsys, digits_model,
                                                                 cache_dir):
    """Found only once the model is loaded and says which of the 360 digits test images it classifies correctly."""
    out = tmp_path / "o"
    err = _exits_2(_module(name).main, argv + ["--out", str(out), "--cache-dir", str(cache_dir), "--no-progress"],
                   capsys)
    assert message in err
    assert not out.exists()


# ----------------------------------------------------------------------------- models that do not fit


def test_check_fits_lists_the_models_that_fit():
    from rnd_jax import models

    assert set(models.INPUT_SHAPES) == set(models.MODELS)
    models.check_fits("digits_cnn", (8, 8, 1), 10)
    with pytest.raises(ValueError, match=r"32x32x3 .* 8x8x1.*\['digits_cnn'\]"):
        models.check_fits("cifar10_cnn", (8, 8, 1), 10, "digits")
    with pytest.raises(ValueError, match="cifar10_cnn.*resnet20.*vgg16.*wrn28_10"):
        models.check_fits("mnist_cnn", (32, 32, 3), 10)
    with pytest.raises(ValueError, match="num_classes"):
        models.check_fits("digits_cnn", (8, 8, 1), 1)


def test_training_a_model_that_does_not_fit_is_refused_before_any_work(tmp_path):
    from rnd_jax import train

    with pytest.raises(ValueError, match="models that fit"):
        train.load_or_train("cifar10_cnn", "digits", cache_dir=tmp_path / "c", progress=False)
    with pytest.raises(ValueError, match="models that fit"):
        train.train("mnist_cnn", "digits", progress=False)
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("name", ["nes_vs_output_noise", "attack_zoo", "decision_attacks", "defense_comparison",
                                  "theory_vs_measurement"])
def test_experiment_refuses_a_model_that_does_not_fit(name, tmp_path, capsys):
    err = _exits_2(_module(name).main, CHEAP.get(name, []) + ["--model", "cifar10_cnn", "--out", str(tmp_path / "o"),
                                                             "--cache-dir", str(tmp_path / "c"), "--no-progress"],
                   capsys)
    assert "cifar10_cnn" in err and "['digits_cnn']" in err
    assert not (tmp_path / "o").exists() and not (tmp_path / "c").exists()


# ----------------------------------------------------------------------------- --smoke keeps explicit options


def test_given_options_sees_an_explicit_default():
    from experiments import nes_vs_output_noise as exp

    parser = exp.get_parser()
    argv = ["--n-images", "100", "--smoke", "--sigmas", "0"]
    args = parser.parse_args(argv)
    assert common.given_options(parser, argv, args) == {"n_images", "smoke", "sigmas"}
    assert args.max_queries == 10_000 and args.n_images == 100  # parsed values are untouched


@pytest.mark.parametrize("name,argv,check", [
    ("nes_vs_output_noise", ["--n-images", "3", "--sigmas", "0"],
     lambda c: c["protocol"]["n_images"] == 3 and c["sigmas"] == [0.0] and c["protocol"]["budget"] == 1000),
    ("attack_zoo", ["--attacks", "nes", "--max-queries", "500"],
     lambda c: c["attacks"][0]["budget"] == 500 and c["n_images"] == 4),
    ("decision_attacks", ["--attacks", "rays", "--n-images", "2"],
     lambda c: c["n_images"] == 2 and c["attacks"] == ["rays"] and c["budget"] == 600),
    ("defense_comparison", ["--n-images", "2", "--budgets", "600"],
     lambda c: c["n_images"] == 2 and c["budgets"] == [600] and c["draws"] == 4),
    ("theory_vs_measurement", ["--n-images", "5"], lambda c: c["n_images"] == 5 and c["draws"] == 32),
    ("foreign_model", ["--attacks", "square_linf", "--budget", "700"],
     lambda c: c["budgets"] == {"square_linf": 700} and c["n_images"] == 3),
])
def test_smoke_changes_only_the_options_not_given(name, argv, check, tmp_path):
    exp = _module(name)
    parser = exp.get_parser()
    argv = ["--smoke", *argv, "--out", str(tmp_path / "o")]
    args = parser.parse_args(argv)
    cfg = exp.configure(args, common.given_options(parser, argv, args))
    assert check(cfg), cfg
    given = {a[2:].replace("-", "_") for a in argv if a.startswith("--")} - {"smoke", "out"}
    assert cfg["smoke"] is True and set(cfg["smoke_kept"]) == given & set(exp.SMOKE)  # recorded as kept
    assert cfg["smoke_set"] and not set(cfg["smoke_set"]) & given  # what smoke set, the user did not give
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- the run log


def test_run_log_keeps_finished_units_and_drops_a_torn_line(tmp_path):
    log = common.RunLog(tmp_path)
    calls = []
    first = log.unit("a", lambda: calls.append("a") or {"x": float("nan"), "t": (1, 2.5)})
    assert calls == ["a"] and first["t"] == [1, 2.5] and first["x"] != first["x"]  # as read back: NaN kept
    with open(tmp_path / common.ROWS, "ab") as f:
        f.write(b'{"unit": "b", "val')  # a kill in the middle of a line
    again = common.RunLog(tmp_path)
    assert list(again.done) == ["a"]
    kept = again.unit("a", lambda: calls.append("again"))
    assert calls == ["a"] and again.resumed == 1  # not recomputed
    assert kept["t"] == [1, 2.5] and kept["x"] != kept["x"]
    again.unit("b", lambda: 7)
    lines = (tmp_path / common.ROWS).read_text().splitlines()
    assert [json.loads(line)["unit"] for line in lines] == ["a", "b"]  # the torn line was cut off


def test_open_run_refuses_another_configuration(tmp_path):
    common.open_run(tmp_path / "o", {"experiment": "x", "n": 1})
    before = (tmp_path / "o" / "config.json").read_bytes()
    common.check_resumable(tmp_path / "o", {"experiment": "x", "n": 1, "train": None})  # the same run: resumable
    with pytest.raises(ValueError, match=r"another configuration \(differs in \['n'\]\)"):
        common.check_resumable(tmp_path / "o", {"experiment": "x", "n": 2})
    with pytest.raises(ValueError, match=r"differs in \['train'\]"):
        common.open_run(tmp_path / "o", {"experiment": "x", "n": 1, "train": {"seed": 0}})
    assert (tmp_path / "o" / "config.json").read_bytes() == before


# ----------------------------------------------------------------------------- benchmarks.throughput


@pytest.mark.parametrize("argv", [["--steps", "0"], ["--steps", "-3"], ["--n-images", "0"], ["--repeats", "0"],
                                  ["--repeats", "-1"], ["--sigmas", "-1"], ["--model", "cifar10_cnn"],
                                  ["--attacks", "nope"], ["--out", "."], ["--out", "no_such_folder/t.json"]])
def test_throughput_refuses_bad_options_before_running(argv, tmp_path, capsys, monkeypatch):
    from benchmarks import throughput

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RND_JAX_CACHE", str(tmp_path / "c"))
    _exits_2(throughput.main, argv, capsys)
    assert list(tmp_path.iterdir()) == []  # nothing trained, nothing written


@pytest.mark.parametrize("argv,message", [
    (["--attacks", "opt", "--set", "opt.lockstep"], "ATTACK.FIELD=VALUE"),
    (["--attacks", "opt", "--set", "opt.nope=1"], "no config field 'nope'"),
    (["--attacks", "opt", "--set", "rays.tol=1"], "not among the attacks run"),
    (["--attacks", "opt", "--set", "opt.lockstep=1"], "lockstep must be a bool"),
    (["--attacks", "opt", "--set", "opt.q=0"], "q must be an int >= 1"),
])
def test_time_to_result_refuses_bad_config_overrides_before_running(argv, message, tmp_path, capsys, monkeypatch):
    from benchmarks import time_to_result

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RND_JAX_CACHE", str(tmp_path / "c"))
    assert message in _exits_2(time_to_result.main, argv, capsys)
    assert list(tmp_path.iterdir()) == []  # nothing trained, nothing written
