"""What a run keeps (``rnd_jax.artifacts``, ``rnd_jax.metric_log``, ``experiments.replay`` / ``reevaluate``).

- a table run (``experiments.paper_tables``) writes each cell's artifact, the metric log and the curves;
  the artifact agrees with the cell's record image by image, its points lie in the eps ball, and its trace
  ends where the run ended (every step is recorded at this budget: the last recorded distance is the
  final point's, the last recorded verdict the attack's own);
- a cell run in chunks, killed with SIGKILL after its second chunk's snapshot and run again, resumes from
  that snapshot (the log says so) and ends with the lines and arrays of the uninterrupted one-program run;
- ``experiments.replay`` reproduces a stored image alone (every field; the tap sees the driver's count)
  and draws its trajectory; unknown cells and images exit 2;
- ``experiments.reevaluate``: the cell's own defense and level give back its stored votes and success
  flags exactly; the undefended model gives the clean model's verdict on the stored points;
- ASR-vs-queries curves against a hand count; the JSONL and TensorBoard writers read back.
"""

import json
import os
import signal
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from experiments import paper_tables, reevaluate, replay
from rnd_jax import artifacts, metric_log, plots, sweep

ROOT = Path(__file__).resolve().parents[1]

# One NES cell at sigma = 1e-2 under the verified rule: 3 images that run to the budget (20 steps of 11
# queries), so a chunk of 4 steps leaves the cell mid-way; one undefended cell that stops early.
GRID = {"name": "keep", "attacks": [{"name": "nes", "config": {"samples": 10}}],
        "defenses": [{"name": "output_noise", "levels": [0.0, 1e-2]}], "norm": "linf", "eps": 0.3,
        "targeted": True, "budgets": [220], "n_images": 3, "acc_draws": 2, "stop_rule": "verified",
        "table": {"mirrors": "a test table", "rows": ["attack"], "cols": ["defense"], "values": ["asr"]}}

KILL_AFTER_SECOND_CHUNK = """
import json, os, signal, sys
from rnd_jax import compile_cache, sweep

compile_cache.enable()  # the resumed run in the test process loads these programs

class Kill:
    def write(self, kind, step, values):
        if kind == "chunk" and step == 2:
            os.kill(os.getpid(), signal.SIGKILL)

    def close(self):
        pass

sweep.run_sweep(json.loads(sys.argv[1]), sys.argv[2], cache_dir=sys.argv[3], progress=False, chunk=4, writer=Kill())
"""


class Recorder:
    def __init__(self):
        self.rows = []

    def write(self, kind, step, values):
        self.rows.append((kind, step, values))

    def close(self):
        pass


@pytest.fixture(scope="module")
def table_run(tmp_path_factory, cache_dir, digits_model):
    """``experiments.paper_tables`` on GRID: (folder, records by id)."""
    folder = tmp_path_factory.mktemp("keep")
    grid_file = folder / "keep.json"
    grid_file.write_text(json.dumps(GRID))
    out = folder / "table"
    paper_tables.main(["--grid", str(grid_file), "--out", str(out), "--no-progress", "--cache-dir", str(cache_dir)])
    return out, sweep.read_results(out / sweep.RESULTS)


def noisy_cell(records):
    return next(r for r in records.values() if r["cell"]["defense"]["level"] > 0)


def test_table_run_keeps_artifacts_log_and_curves(table_run, cache_dir):
    out, records = table_run
    assert len(records) == 2
    for name in ("asr_vs_queries.png", "median_queries.png", "table.png"):
        assert (out / name).stat().st_size > 1000, name
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in log if r["kind"] == "cell") == sorted(records)
    sel = sweep.Sweeper(cache_dir=cache_dir).selection(noisy_cell(records)["cell"])
    for cid, rec in records.items():
        a = artifacts.check_cell(artifacts.read(artifacts.artifact_path(out, cid)), cid, "artifact")
        im = rec["images"]
        for key in ("index", "label", "target", "queries", "loss_queries", "check_queries", "steps", "claims",
                    "lucky", "stopped_success", "invalid", "clean_pred", "check_votes", "success", "success_stop",
                    "success_clean", "success_lucky"):
            assert a[key].tolist() == im[key], (rec["label"], key)
        assert a["index"].tolist() == sel.index.tolist()
        d = (a["x_adv"] - sel.images).reshape(3, -1)
        assert np.abs(d).max() <= 0.3 + 1e-6
        assert (a["clean_pred"] == a["scores_clean"].argmax(1)).all()
        for i in range(3):  # 20 steps <= 256 slots: every step recorded, the last one is the final point's
            used = a["trace_queries"][i] >= 0
            assert used.sum() == im["steps"][i] and (np.diff(a["trace_queries"][i][used]) > 0).all()
            last = np.flatnonzero(used)[-1]
            np.testing.assert_allclose(a["trace_l2"][i][last], np.linalg.norm(d[i]), rtol=1e-5)
            np.testing.assert_allclose(a["trace_linf"][i][last], np.abs(d[i]).max(), rtol=1e-5)
            assert bool(a["trace_claimed"][i][last]) == im["lucky"][i]
    noisy = noisy_cell(records)
    assert noisy["images"]["queries"] == [220, 220, 220] or min(noisy["images"]["steps"]) > 8  # runs long enough


def test_killed_chunked_cell_resumes_to_the_uninterrupted_result(table_run, tmp_path, cache_dir):
    ref_out, records = table_run
    grid = {k: v for k, v in GRID.items() if k != "table"}
    grid["defenses"] = [{"name": "output_noise", "levels": [1e-2]}]
    cid = noisy_cell(records)["id"]
    out = tmp_path / "chunked"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    p = subprocess.run([sys.executable, "-c", KILL_AFTER_SECOND_CHUNK, json.dumps(grid), str(out), str(cache_dir)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    snap = artifacts.snapshot_path(out, cid)
    assert snap.exists() and not sweep.read_results(out / sweep.RESULTS)
    log = Recorder()
    sweep.run_sweep(grid, out, cache_dir=cache_dir, progress=False, chunk=4, writer=log)
    chunks = [(step, v["resumed"]) for kind, step, v in log.rows if kind == "chunk"]
    assert chunks[0] == (3, True) and chunks[-1][0] == 5, chunks  # resumed after chunk 2 of 5
    assert not snap.exists()  # removed once the cell is recorded
    got = sweep.read_results(out / sweep.RESULTS)[cid]
    assert json.dumps(got, sort_keys=True) == json.dumps(records[cid], sort_keys=True)
    a, b = (artifacts.read(artifacts.artifact_path(o, cid)) for o in (out, ref_out))
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(a[k], b[k], equal_nan=a[k].dtype.kind == "f"), k


def test_replay_reproduces_a_stored_image(table_run, cache_dir, tmp_path, capsys):
    out, records = table_run
    cid = noisy_cell(records)["id"]
    summary = replay.main(["--results", str(out), "--cell", cid[:6], "--image", "1", "--cache-dir", str(cache_dir),
                           "--out", str(tmp_path / "r")])
    assert summary["reproduced"] and summary["artifact"]
    fields = {r["field"] for r in summary["fields"]}
    assert {"queries", "steps", "check_votes", "x_adv", "trace_loss", "trace_claimed", "tapped queries"} <= fields
    assert summary["answers"]["queries"] == records[cid]["images"]["queries"][1]
    assert (tmp_path / "r" / "trajectory.png").stat().st_size > 1000
    assert json.loads((tmp_path / "r" / "replay.json").read_text())["reproduced"] is True
    for argv, words in ((["--cell", "zzzz"], "no cell id starts with 'zzzz'"),
                        (["--cell", cid, "--image", "3"], "--image must be in 0..2")):
        with pytest.raises(SystemExit) as e:
            replay.main(["--results", str(out), "--cache-dir", str(cache_dir), *argv])
        assert e.value.code == 2 and words in capsys.readouterr().err


def test_reevaluate_gives_back_the_stored_votes(table_run, cache_dir, tmp_path):
    out, records = table_run
    rec = noisy_cell(records)
    rows = reevaluate.main(["--results", str(out), "--cell", rec["id"], "--defense", "output_noise",
                            "--levels", "0.01", "0", "--cache-dir", str(cache_dir), "--out", str(tmp_path)])
    own, clean = rows
    assert own["check_votes"] == rec["images"]["check_votes"] and own["success"] == rec["images"]["success"]
    assert own["asr"] == rec["metrics"]["asr"]
    a = artifacts.read(artifacts.artifact_path(out, rec["id"]))
    fooled = a["scores_clean"].argmax(1) == a["target"]  # targeted; all points are in the ball (checked above)
    assert clean["success"] == fooled.tolist() and clean["asr"] == clean["asr_clean"] == fooled.mean()
    assert (tmp_path / "reevaluate.csv").exists()


def test_bad_keep_options_fail_before_anything_is_written(tmp_path):
    for kw, words in (({"chunk": 0}, "chunk must be an int"), ({"chunk": True}, "chunk must be an int"),
                      ({"metrics": "wandb"}, "unknown metric writer 'wandb'")):
        with pytest.raises(ValueError, match=words):
            sweep.run_sweep(GRID, tmp_path / "x", progress=False, **kw)
        assert not (tmp_path / "x").exists()
    with pytest.raises(ValueError, match="no artifact file"):
        artifacts.read(tmp_path / "missing.npz")
    (tmp_path / "torn.npz").write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(ValueError, match="cannot read"):
        artifacts.read(tmp_path / "torn.npz")


def test_success_curve_counts_successes_by_their_stop():
    qs, y = plots.success_curve([10, 50, 50, 200], [True, True, False, True], budget=200, points=201)
    at = dict(zip(qs.tolist(), y.tolist()))
    assert at[0] == 0 and at[9] == 0 and at[10] == 0.25 and at[49] == 0.25 and at[50] == 0.5 and at[200] == 0.75


def _events(path):
    """The scalar values of a TensorBoard event file, read as TFRecords with tensorboardX's protobufs."""
    from tensorboardX.proto import event_pb2

    raw, out, i = path.read_bytes(), {}, 0
    while i < len(raw):
        (n,) = struct.unpack("<Q", raw[i:i + 8])
        ev = event_pb2.Event.FromString(raw[i + 12:i + 12 + n])
        i += 12 + n + 4
        for v in ev.summary.value:
            out.setdefault(v.tag, []).append((ev.step, v.simple_value))
    return out


def test_metric_writers_read_back(tmp_path):
    w = metric_log.make_writer("jsonl", tmp_path)
    w.write("cell", 0, {"id": "abc", "asr": 0.5, "queries_mean": float("nan")})
    w.write("chunk", 3, {"id": "abc", "label": "nes vs none", "queries_mean": 12.0})
    w.close()
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["step"]) for r in rows] == [("cell", 0), ("chunk", 3)]
    assert rows[0]["asr"] == 0.5 and rows[0]["queries_mean"] is None and rows[1]["label"] == "nes vs none"
    pytest.importorskip("tensorboardX")
    tb = metric_log.make_writer("tensorboard", tmp_path)
    tb.write("cell", 2, {"id": "abc", "asr": 0.25})
    tb.write("chunk", 7, {"label": "nes vs none", "queries_mean": 12.0})
    tb.close()
    (event_file,) = (tmp_path / "tensorboard").glob("events.out.tfevents.*")
    scalars = _events(event_file)
    assert scalars["cell/asr"] == [(2, 0.25)] and scalars["chunk/nes_vs_none/queries_mean"] == [(7, 12.0)]
