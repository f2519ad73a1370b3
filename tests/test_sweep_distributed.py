"""A sweep across processes (``jax.distributed``): every process runs every cell together on the global mesh,
process 0 alone reads and writes the results folder and claims the cells, and the others follow its decisions.

- plain Python (fast): process 0's decisions (cells already done, a cell held by another run, then waited
  for) replayed on a follower make it run the same cells in the same order, and the follower touches no file;
- two real processes on this machine joined with ``jax.distributed`` (CPU, localhost coordinator, gloo
  collectives) write exactly the lines of the one-process run (slow: the fast test covers the decisions).
"""

import fcntl
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from rnd_jax import sweep

ROOT = Path(__file__).resolve().parents[1]

GRID = {"name": "dist", "attacks": [{"name": "nes", "config": {"samples": 10}}],
        "defenses": [{"name": "output_noise", "levels": [0.0, 1e-2, 1e-1]}], "norm": "linf", "eps": 0.3,
        "targeted": True, "budgets": [22], "n_images": 2, "acc_draws": 1}


def complete_record(cell):
    """A record that passes :func:`rnd_jax.sweep.check_record` (what a real run writes, with dummy values)."""
    return {"id": cell.id, "label": cell.label, "cell": cell.d, "level": cell.d["defense"].get("level"),
            "calibration": None, "attack_config": {}, "cost": 11,
            "defended": dict.fromkeys(sweep.DEFENDED_FIELDS, 1.0),
            "metrics": {**dict.fromkeys(sweep.METRIC_FIELDS, 0.5), "n_images": 1},
            "images": {k: [0] for k in ("queries", "success", "success_stop", "success_lucky", "success_clean")}}


class FakeSweeper:
    """Runs nothing: records which cells it was asked to run."""

    n_devices = 1

    def __init__(self):
        self.ran = []

    def has_model(self, c):
        return True

    def selection(self, c):
        return None

    def run_cell(self, cell, **_):
        self.ran.append(cell.id)
        return complete_record(cell), {}  # (record, artifact arrays)


def test_followers_run_what_process_0_decides_and_write_nothing(tmp_path, monkeypatch):
    cells = sweep.expand(GRID)
    out = tmp_path / "out"
    out.mkdir()
    (out / sweep.RESULTS).write_text(json.dumps(complete_record(cells[0])) + "\n")  # done by an earlier run
    (out / sweep.CLAIMS).mkdir()
    held = open(out / sweep.CLAIMS / cells[2].id, "w")  # another run is on cell 2 ...
    fcntl.flock(held, fcntl.LOCK_EX)
    release = threading.Timer(0.3, held.close)  # ... and finishes it without writing it (it died)

    said = []
    decided = []

    def leader(values):  # process 0: its values are everyone's
        decided.append([int(v) for v in values])
        if len(decided) == 3:  # cell 2 was busy: let the other run go while this one waits for it
            release.start()
        return values

    monkeypatch.setattr(sweep, "_broadcast", lambda v: np.asarray(leader(v), np.int32))
    first = FakeSweeper()
    records = sweep.run_sweep(GRID, out, progress=False, sweeper=first, log=said.append)
    release.join()
    run, done, busy = (sweep.ACTIONS.index(a) for a in ("run", "done", "busy"))
    assert decided == [[1, 0, 0], [run], [busy], [run]]
    assert first.ran == [cells[1].id, cells[2].id] and any("another run" in s for s in said)
    assert [r["id"] for r in records] == [c.id for c in cells]

    # a follower (process 1) given the same decisions runs the same cells in the same order, and writes nothing
    script = iter(decided)
    monkeypatch.setattr(sweep, "_is_writer", lambda: False)
    monkeypatch.setattr(sweep, "_broadcast", lambda v: np.asarray(next(script), np.int32))
    follower = FakeSweeper()
    elsewhere = tmp_path / "follower"
    got = sweep.run_sweep(GRID, elsewhere, progress=False, sweeper=follower, log=said.append)
    assert follower.ran == first.ran and next(script, None) is None
    assert not elsewhere.exists()
    assert [r and r["id"] for r in got] == [None, cells[1].id, cells[2].id]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_write_the_lines_of_one(tmp_path, cache_dir, digits_model):
    grid = tmp_path / "dist.json"
    grid.write_text(json.dumps(GRID))
    one = tmp_path / "one"
    sweep.run_sweep(grid, one, cache_dir=cache_dir, progress=False)
    out = tmp_path / "two"
    port = _free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    procs = [subprocess.Popen([sys.executable, "-m", "experiments.sweep", "--grid", str(grid), "--out", str(out),
                               "--cache-dir", str(cache_dir), "--no-progress", "--distributed",
                               "--coordinator-address", f"127.0.0.1:{port}", "--num-processes", "2",
                               "--process-id", str(i)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE) for i in range(2)]
    errs = [p.communicate(timeout=600)[1].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e[-3000:] for e in errs]
    assert all("on 2 device(s)" in e for e in errs)
    assert (out / sweep.RESULTS).read_text() == (one / sweep.RESULTS).read_text()
    assert {json.loads(t)["devices"] for t in (out / sweep.TIMING).read_text().splitlines()} == {2}
