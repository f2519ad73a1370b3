"""The attack-zoo experiment end to end (--smoke), its outputs, replay, and its input checks."""

import json

import pytest

from experiments import attack_zoo as exp
from rnd_jax.attacks import ATTACKS


def test_help_lists_every_option(capsys):
    with pytest.raises(SystemExit) as e:
        exp.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for opt in ("--dataset", "--model", "--attacks", "--n-images", "--max-queries", "--sigmas", "--nus",
                "--targeted", "--seed", "--surrogate-seed", "--out", "--smoke"):
        assert opt in text
    for name in exp.score_attacks():
        assert name in text


@pytest.mark.parametrize("argv", [
    ["--attacks", "no_such_attack"], ["--attacks", "hsja"], ["--sigmas", "-1e-3"], ["--nus", "nan"],
    ["--n-images", "0"], ["--max-queries", "0"], ["--max-queries", "5", "--attacks", "nes"],
    ["--dataset", "imagenet"], ["--model", "resnet"], ["--surrogate-seed", "0"], ["--acc-draws", "0"]])
def test_bad_options_fail_before_any_work(argv, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        exp.main(argv + ["--out", str(tmp_path / "o")])
    assert e.value.code == 2
    assert "error" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cells_run_the_undefended_cell_once():
    assert exp.cells([0.0, 1e-4, 1e-2], [0.0, 1e-3]) == [
        ("none", 0.0), ("output_noise", 1e-4), ("output_noise", 1e-2), ("input_noise", 1e-3)]
    assert exp.cells([1e-3], [1e-3]) == [("output_noise", 1e-3), ("input_noise", 1e-3)]


def check_smoke_results(out, names):
    for f in ("results.json", "results.csv", "config.json", "asr_vs_noise.png", "timing.json"):
        assert (out / f).stat().st_size > 0, f
    res = json.loads((out / "results.json").read_text())
    rows = res["rows"]
    assert [r["attack"] for r in rows[::2]] == names
    assert [(r["defense"], r["level"]) for r in rows] == [("none", 0.0), ("output_noise", 1e-2)] * len(names)
    for r in rows:
        assert r["n_images"] == 4 and r["check_queries"] == 4 * 9
        assert r["queries_total"] <= 4 * r["budget"]
        assert r["eps"] == ATTACKS[r["attack"]].battery["eps"] and r["norm"] == ATTACKS[r["attack"]].battery["norm"]
        per = res["images"][f"{r['attack']}/{r['defense']}/{r['level']:g}"]
        assert len(per["queries"]) == 4 and all(q <= r["budget"] for q in per["queries"])
        assert all(t != y for t, y in zip(per["target"], per["label"]))
    undefended = [r["asr"] for r in rows if r["defense"] == "none"]
    assert sum(undefended) / len(undefended) >= 0.5  # tiny budgets, but most attacks succeed undefended
    return res


def test_smoke_run_writes_results_and_replays(tmp_path, digits_model, cache_dir):
    """Three attacks (one needs the surrogate); the whole registry runs in the slow test below."""
    out = tmp_path / "three"
    names = ["bandits_td", "prgf", "signhunter"]
    exp.main(["--smoke", "--out", str(out), "--cache-dir", str(cache_dir), "--no-progress", "--attacks", *names])
    res = check_smoke_results(out, names)
    rows = res["rows"]
    # The same run again into the same folder: every row comes from rows.jsonl (no runner is compiled) and
    # results.json is byte-identical.
    before = (out / "results.json").read_bytes()
    exp.main(["--smoke", "--out", str(out), "--cache-dir", str(cache_dir), "--no-progress", "--attacks", *names])
    timing = json.loads((out / "timing.json").read_text())
    assert timing["resumed_rows"] == len(rows) and not any(k.endswith("/compile") for k in timing)
    assert (out / "results.json").read_bytes() == before
    # Replay: one attack run alone (plus an input-noise cell) reproduces its rows and images bit for bit.
    sub = tmp_path / "sub"
    exp.main(["--smoke", "--out", str(sub), "--cache-dir", str(cache_dir), "--no-progress",
              "--attacks", "signhunter", "--nus", "0", "1e-2"])
    again = json.loads((sub / "results.json").read_text())
    both = [r for r in again["rows"] if r["defense"] != "input_noise"]
    assert both == [r for r in rows if r["attack"] == "signhunter"]
    assert [r["attack"] for r in again["rows"] if r["defense"] == "input_noise"] == ["signhunter"]
    for k, v in again["images"].items():
        assert k.split("/")[1] == "input_noise" or res["images"][k] == v


@pytest.mark.slow
def test_smoke_run_covers_every_targeted_score_attack(tmp_path, digits_model, cache_dir):
    out = tmp_path / "all"
    exp.main(["--smoke", "--out", str(out), "--cache-dir", str(cache_dir), "--no-progress"])
    check_smoke_results(out, [n for n in exp.score_attacks() if ATTACKS[n].supports_targeted])


def test_cifar10_cells_use_the_papers_settings_at_that_size(tmp_path):
    from rnd_jax import presets

    args = exp.get_parser().parse_args(["--dataset", "cifar10", "--attacks", "square_linf", "nes",
                                        "--eps-linf", "0.0314", "--out", str(tmp_path / "o")])
    runs = {r["attack"]: r["config"] for r in exp.configure(args)["attacks"]}
    assert runs["square_linf"]["eps"] == runs["nes"]["eps"] == 0.0314
    assert runs["square_linf"]["p_init"] == presets.ATTACK_PRESETS["square_linf"]["cifar10"]["p_init"]
    digits = {r["attack"]: r["config"] for r in exp.configure(exp.get_parser().parse_args(
        ["--attacks", "square_linf", "--out", str(tmp_path / "o")]))["attacks"]}
    assert digits["square_linf"]["eps"] == ATTACKS["square_linf"].battery["eps"]
    assert not (tmp_path / "o").exists()
