"""experiments.theory_vs_measurement end to end (--smoke): outputs, the paper's numbers, its checks."""

import json
import math

import pytest

from experiments import theory_vs_measurement as exp


def test_help_lists_every_option(capsys):
    with pytest.raises(SystemExit) as e:
        exp.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for opt in ("--dataset", "--model", "--n-images", "--sigmas", "--beta", "--draws", "--small", "--eps-n", "--mu",
                "--nu-rel", "--layers", "--seed", "--out", "--cache-dir", "--smoke", "--no-progress"):
        assert opt in text


@pytest.mark.parametrize("argv", [["--sigmas", "0"], ["--sigmas", "-1e-3"], ["--sigmas", "nan"], ["--beta", "0"],
                                  ["--eps-n", "0.7"], ["--eps-n", "0"], ["--draws", "0"], ["--n-images", "0"],
                                  ["--layers", "conv9"], ["--dataset", "imagenet"], ["--model", "resnet"],
                                  ["--nu-rel", "-1"], ["--mu", "0"]])
def test_bad_options_fail_before_any_work(argv, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        exp.main(argv + ["--out", str(tmp_path / "o")])
    assert e.value.code == 2
    assert "error" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_smoke_run_reports_theory_beside_measurement(tmp_path, digits_model, cache_dir, capsys):
    out = tmp_path / "run"
    exp.main(["--smoke", "--out", str(out), "--cache-dir", str(cache_dir), "--no-progress"])
    for f in ("results.json", "config.json", "timing.json", "fig2_accuracy_snr.png", "fig3_R_N.png",
              "fig6_prob_negative.png", "sign_flips.png"):
        assert (out / f).stat().st_size > 0, f
    printed = capsys.readouterr().out
    assert "Section IV-A recomputed" in printed and "Errata" in printed
    res = json.loads((out / "results.json").read_text())

    # Section IV-A from the paper's Table 1: R reproduced to its printed digit, SNR printed 3 dB high.
    for row in res["section_iva"]:
        assert row["R_matches"], row
        assert row["snr_db_error"] == pytest.approx(10 * math.log10(2), abs=0.05)

    # Digits: predicted vs measured SNR of A within 3 dB where the small-noise assumption holds;
    # the rows say where it does not.
    rows = res["nes_factor"]
    assert [r["sigma"] for r in rows] == [1e-6, 1e-4, 1e-2]
    for r in rows:
        assert r["holds"] in ("yes", "partly", "no")
        if r["n_valid"]:
            assert abs(r["snr_delta_db"]) <= 3.0, r
        else:
            assert r["holds"] == "no" and r["snr_pred_db"] is None
        assert abs(r["pflip_meas"] - r["pflip_exact"]) <= 5 * r["pflip_se"]
    assert rows[0]["n_valid"] > 0
    for r in res["accuracy"]:
        assert abs(r["acc_meas"] - r["acc_pred"]) <= 0.01

    # Sign flips: eq. (26) within Monte-Carlo error plus a linearisation allowance.
    for r in res["sign_flips"]:
        assert abs(r["p_meas"] - r["p_eq26"]) <= 4 * r["p_se"] + 0.03, r

    # Errata: the corrected forms agree with the Monte-Carlo, the printed ones do not.
    errata = {r["erratum"].split(" (")[0]: r for r in res["errata"]}
    for r in res["errata"]:
        assert abs(r["monte_carlo"] - r["corrected"]) <= 5 * r["mc_se"] + 1e-4, r
    for name in ("Aithal-Li eq.17", "Aithal-Li Remark 2", "Park 5.2"):
        r = errata[name]
        assert abs(r["monte_carlo"] - r["printed"]) > 8 * r["mc_se"], r
    assert res["config"]["n_images"] == 12 and res["notes"]
