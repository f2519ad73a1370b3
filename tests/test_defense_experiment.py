import json

import numpy as np
import pytest

from experiments import defense_comparison as exp
from rnd_jax import artifacts


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        exp.main(["--help"])
    assert e.value.code == 0 and "--drops" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["--drops", "0"], ["--drops", "1.5"], ["--attacks", "nope"], ["--bits", "0"],
                                  ["--budgets", "0"], ["--alphas", "-1"], ["--dataset", "x"],
                                  ["--layers", "conv9"]])
def test_bad_options_exit_before_work(argv, tmp_path):
    with pytest.raises(SystemExit) as e:
        exp.main(argv + ["--out", str(tmp_path / "o")])
    assert e.value.code == 2 and not (tmp_path / "o").exists()


def test_smoke(tmp_path, digits_model, cache_dir):
    out = tmp_path / "dc"
    exp.main(["--smoke", "--out", str(out), "--cache-dir", str(cache_dir), "--no-progress"])
    for f in ("results.json", "results.csv", "layers.csv", "baselines.csv", "calibration.csv", "config.json",
              "robust_accuracy.png", "timing.json"):
        assert (out / f).stat().st_size > 0, f
    res = json.loads((out / "results.json").read_text())
    assert [r["defense"] for r in res["main"]][0] == "none"
    assert len(res["main"]) == 1 + 3 and [r["layer"] for r in res["layers"]] == ["dense1"]
    assert [r["defense"] for r in res["baselines"]][0] == "quantize 2 bit"
    for c in res["calibration"]:
        assert 0 <= c["target_drop"] - c["drop"] <= 0.003
    none = res["main"][0]
    assert none["nes_robust_510"] <= 0.5  # undefended NES fools most images even at 510 queries
    # each attack cell's artifact: its images' records, agreeing with the row
    a = artifacts.read(exp.artifact_file(out, "main", "none", None, "nes"))
    assert a["x_adv"].shape[0] == res["config"]["images"]["untargeted"]["attacked"]
    assert float(np.mean(a["success_stop"] & (a["queries"] <= 510))) == pytest.approx(
        none["nes_asr_510"])
    for r in res["layers"]:
        assert exp.artifact_file(out, "layer", r["layer"], "nes").exists()

    # The same run again into the same folder: every calibration and row comes from rows.jsonl (nothing is
    # calibrated or attacked again) and results.json is byte-identical.
    before = (out / "results.json").read_bytes()
    exp.main(["--smoke", "--out", str(out), "--cache-dir", str(cache_dir), "--no-progress"])
    units = len(res["calibration"]) + len(res["main"]) + len(res["layers"]) + len(res["baselines"])
    assert json.loads((out / "timing.json").read_text())["resumed_rows"] == units
    assert len((out / "rows.jsonl").read_text().splitlines()) == units
    assert (out / "results.json").read_bytes() == before
