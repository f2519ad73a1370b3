"""The decision-attack experiment end to end (--smoke), its outputs, replay, and its input checks."""

import json

import numpy as np
import pytest

from experiments import decision_attacks as exp
from rnd_jax import artifacts


def test_help_lists_every_option(capsys):
    with pytest.raises(SystemExit) as e:
        exp.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for opt in ("--attacks", "--n-images", "--max-queries", "--checkpoints", "--nus", "--sigmas", "--eps-l2",
                "--eps-linf", "--clean-draws", "--seed", "--out", "--smoke"):
        assert opt in text


@pytest.mark.parametrize("argv", [["--nus", "-1e-3"], ["--sigmas", "nan"], ["--attacks", "nes"], ["--attacks", "nope"],
                                  ["--max-queries", "0"], ["--checkpoints", "2000", "20000"], ["--eps-l2", "0"],
                                  ["--n-images", "0"], ["--dataset", "imagenet"]])
def test_bad_options_fail_before_any_work(argv, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        exp.main(argv + ["--out", str(tmp_path / "o")])
    assert e.value.code == 2
    assert "error" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_smoke_run_writes_results(tmp_path, digits_model, cache_dir):
    out = tmp_path / "a"
    exp.main(["--smoke", "--out", str(out), "--cache-dir", str(cache_dir), "--no-progress"])
    for f in ("results.json", "results.csv", "config.json", "asr_vs_queries.png", "timing.json"):
        assert (out / f).stat().st_size > 0, f
    res = json.loads((out / "results.json").read_text())
    rows = res["rows"]
    assert {r["attack"] for r in rows} == set(exp.SMOKE_ATTACKS)
    assert {(r["defense"], r["level"]) for r in rows} == {("input_noise", 0.0), ("input_noise", 1e-2),
                                                          ("output_noise", 1e-2)}
    for r in rows:
        assert r["queries_total"] <= 3 * 600
        assert 0.0 <= r["asr@200"] <= r["asr@600"] <= 1.0  # ASR can only grow with the budget
        assert r["asr_clean@200"] <= r["asr_clean@600"] and r["asr_lucky@200"] <= r["asr_lucky@600"]
        assert r["l2_query"] is not None and r["l2_query"] > 0
        if r["level"] == 0.0:  # undefended: every answer is the clean one
            assert r["p_mis"] == 0.0 and r["p_mis_clean"] == 0.0
            assert r["asr@600"] >= 1 / 3
        else:
            assert 0.0 <= r["p_mis_clean"] <= r["p_mis"] <= 1.0  # noise flips more answers near the boundary
        # each row's artifact: its images' records, agreeing with the row's metrics
        a = artifacts.read(exp.artifact_file(out, r["attack"], r["defense"], r["level"]))
        assert a["x_adv"].shape == (r["n_images"], 8, 8, 1) and int(a["queries"].sum()) == r["queries_total"]
        assert float(np.mean(a["success"] & (a["queries"] <= 600))) == r["asr@600"]
        assert float(np.mean(a["success_lucky"] & (a["queries"] <= 200))) == r["asr_lucky@200"]
        assert a["scores_clean"].shape == (r["n_images"], 10) and (a["trace_queries"][:, 0] >= 0).all()


def test_smoke_run_replays_bit_identically(tmp_path, digits_model, cache_dir):
    outs = []
    for name in ("a", "b"):
        out = tmp_path / name
        exp.main(["--smoke", "--attacks", "rays", "--out", str(out), "--cache-dir", str(cache_dir), "--no-progress"])
        outs.append((out / "results.json").read_bytes())
    assert outs[0] == outs[1]
    # The same run again into the same folder: every row comes from rows.jsonl, results.json is byte-identical.
    exp.main(["--smoke", "--attacks", "rays", "--out", str(out), "--cache-dir", str(cache_dir), "--no-progress"])
    assert json.loads((out / "timing.json").read_text())["resumed_rows"] == 3  # rays x (nu 0, nu 1e-2, sigma 1e-2)
    assert (out / "results.json").read_bytes() == outs[1]
