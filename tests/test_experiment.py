"""The headline experiment end to end (--smoke), its outputs, replay, and its input checks."""

import json

import pytest

from experiments import nes_vs_output_noise as exp


def test_help_lists_every_option(capsys):
    with pytest.raises(SystemExit) as e:
        exp.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for opt in ("--dataset", "--model", "--n-images", "--max-queries", "--sigmas", "--norm", "--eps",
                "--targeted", "--seed", "--out", "--smoke"):
        assert opt in text


@pytest.mark.parametrize("argv", [["--sigmas", "-1e-3"], ["--sigmas", "nan"], ["--dataset", "imagenet"],
                                  ["--model", "resnet"], ["--max-queries", "0"], ["--samples", "3"],
                                  ["--eps", "-0.1"], ["--n-images", "0"], ["--norm", "l1"]])
def test_bad_options_fail_before_any_work(argv, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        exp.main(argv + ["--out", str(tmp_path / "o")])
    assert e.value.code == 2
    assert "error" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_smoke_run_writes_results_and_replays_bit_identically(tmp_path, digits_model, cache_dir):
    outs = []
    for name in ("a", "b"):
        out = tmp_path / name
        exp.main(["--smoke", "--out", str(out), "--cache-dir", str(cache_dir), "--no-progress"])
        for f in ("results.json", "results.csv", "config.json", "asr_vs_sigma.png", "timing.json"):
            assert (out / f).stat().st_size > 0, f
        outs.append((out / "results.json").read_bytes())
    assert outs[0] == outs[1]
    res = json.loads(outs[0])
    rows = res["rows"]
    assert [r["sigma"] for r in rows] == [0.0, 1e-2]
    assert rows[0]["asr"] >= 0.75  # 8 images, 1 000 queries, undefended
    assert rows[1]["asr"] <= rows[0]["asr"]
    assert rows[1]["acc_defended_mean"] >= rows[0]["acc_defended_mean"] - 0.01
    for r in rows:
        assert r["queries_total"] <= 8 * 1000
    per = res["images"]["0"]
    assert len(per["queries"]) == 8 and all(q <= 1000 for q in per["queries"])
    assert all(t != y for t, y in zip(per["target"], per["label"]))


@pytest.mark.parametrize("module", ["nes_vs_output_noise", "attack_zoo", "decision_attacks", "defense_comparison"])
def test_unprepared_dataset_prints_the_message_and_exits_2(module, tmp_path, capsys):
    """A tfds dataset that is not prepared in --data-dir: the message saying how to prepare it, no traceback."""
    import importlib

    from experiments.common import cli

    mod = importlib.import_module(f"experiments.{module}")
    with pytest.raises(SystemExit) as e:
        cli(mod.main, ["--dataset", "mnist", "--data-dir", str(tmp_path / "tfds"), "--out", str(tmp_path / "o"),
                       "--no-progress"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "mnist" in err and "tfds build" in err and "Traceback" not in err
