"""The headline experiment end to end (--smoke), its outputs, replay, resume after kill -9, and its input checks."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rnd_jax import artifacts

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


def _killed_after_first_row(out, cache_dir, tmp_path):
    """Start the smoke run in a subprocess and ``kill -9`` it as soon as its first row is in ``rows.jsonl``."""
    argv = [sys.executable, "-m", "experiments.nes_vs_output_noise", "--smoke", "--out", str(out), "--cache-dir",
            str(cache_dir), "--no-progress"]
    with open(tmp_path / "killed.err", "wb") as err:  # RND_JAX_CACHE and XLA_FLAGS are inherited
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err, cwd=Path(__file__).parents[1])
        rows, t0 = out / "rows.jsonl", time.time()
        try:
            while proc.poll() is None and time.time() - t0 < 600:
                if rows.exists() and rows.read_bytes().endswith(b"\n"):
                    proc.kill()  # SIGKILL: no handler, no cleanup
                    break
                time.sleep(0.02)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "killed.err").read_text()[-2000:]


def test_smoke_run_writes_results_and_replays_bit_identically(tmp_path, digits_model, cache_dir, capsys):
    """Run a in one go; run b is killed (kill -9) after its first sigma row and started again: it resumes
    from that row and ends with the same results.json, byte for byte."""
    a, b = tmp_path / "a", tmp_path / "b"
    argv = ["--smoke", "--out", str(a), "--cache-dir", str(cache_dir), "--no-progress"]
    exp.main(argv)
    for f in ("results.json", "results.csv", "config.json", "asr_vs_sigma.png", "timing.json", "rows.jsonl",
              "asr_vs_queries.png", "artifacts/sigma=0.npz", "artifacts/sigma=0.01.npz"):
        assert (a / f).stat().st_size > 0, f
    _killed_after_first_row(b, cache_dir, tmp_path)
    assert not (b / "results.json").exists()  # the kill came before the end
    assert [json.loads(line)["unit"] for line in (b / "rows.jsonl").read_text().splitlines()] == ["sigma=0.0"]
    capsys.readouterr()
    exp.main(["--smoke", "--out", str(b), "--cache-dir", str(cache_dir), "--no-progress"])
    assert "1 finished unit(s)" in capsys.readouterr().err
    timing = json.loads((b / "timing.json").read_text())
    assert timing["resumed_rows"] == 1 and "0" not in timing and "0.01" in timing  # sigma 0 was not recomputed
    outs = [(a / "results.json").read_bytes(), (b / "results.json").read_bytes()]
    assert outs[0] == outs[1]
    cfg = json.loads((a / "config.json").read_text())  # what was used, smoke included
    assert cfg["protocol"]["n_images"] == cfg["images"]["attacked"] == 8 and cfg["protocol"]["budget"] == 1000
    assert cfg["smoke"] is True and cfg["smoke_set"]["sigmas"] == [0.0, 0.01] and cfg["smoke_kept"] == {}
    assert cfg["model"] == "digits_cnn" and cfg["train"]["seed"] == 0

    # Another configuration into the same folder is refused before any work; its config.json stays.
    before = (a / "config.json").read_bytes()
    with pytest.raises(SystemExit) as e:
        exp.main(argv + ["--seed", "1"])
    assert e.value.code == 2 and "another configuration" in capsys.readouterr().err
    assert (a / "config.json").read_bytes() == before
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
    kept = artifacts.read(a / "artifacts" / "sigma=0.npz")  # the row's arrays agree with its records
    assert kept["queries"].tolist() == per["queries"] and kept["x_adv"].shape == (8, 8, 8, 1)
    assert (kept["clean_pred"] == kept["scores_clean"].argmax(1)).all()
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
    assert not (tmp_path / "o").exists()  # nothing written
