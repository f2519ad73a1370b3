"""Sweeps (``rnd_jax.sweep``, ``experiments.sweep``): cells and ids, validation, sharding, resume.

- grid expansion: the product of the axes, ids that depend only on the cell (not on the grid's
  key order or on the other cells), a golden id, the per-cell key;
- bad grids fail before any cell runs (nothing is created), naming the offending entry;
- a sweep sharded over 4 CPU devices (a subprocess with ``--xla_force_host_platform_device_count=4``)
  writes exactly the lines of the one-device run (5 images: padded to 8);
- at equal total queries, EOT (M = 5) does not give NES its undefended success back at sigma = 1e-2;
- a sweep killed with SIGKILL mid-run and re-run ends with the lines of an uninterrupted run, none
  lost or duplicated; a partially written last line is dropped and its cell re-run;
- resume trusts only complete records: a bare id, a record under another cell's id, a line that is not
  JSON, a record missing a field and a second record of a cell are moved to ``results.rejected.jsonl``
  with their reasons, and their cells run again;
- two runs into one folder (a sweep process and this one) run and write each cell once.
"""

import copy
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import pytest

from experiments import sweep as cli
from rnd_jax import grids, sweep
from rnd_jax.attacks import ATTACKS

ROOT = Path(__file__).resolve().parents[1]

# 4 cells, 2 compiled programs (the noise level is traced); 5 images, so 4 devices need padding.
TINY = {"name": "tiny", "attacks": [{"name": "nes", "config": {"samples": 10}, "eot": [1, 5]}],
        "defenses": [{"name": "output_noise", "levels": [0.0, 1e-2]}], "norm": "linf", "eps": 0.3,
        "targeted": True, "budgets": [440], "n_images": 5, "acc_draws": 2}
ONE_PROGRAM = dict(TINY, attacks=[{"name": "nes", "config": {"samples": 10}}])  # its first two cells


def lines(path):
    return Path(path).read_text().splitlines()


def by_id(text_lines):
    out = {}
    for line in text_lines:
        rid = json.loads(line)["id"]
        assert rid not in out, f"duplicate cell {rid}"
        out[rid] = line
    return out


def run_cli(args, env_extra=None, **kw):
    env = dict(os.environ, JAX_PLATFORMS="cpu", **(env_extra or {}))
    return subprocess.Popen([sys.executable, "-m", "experiments.sweep", *args, "--no-progress"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


@pytest.fixture(scope="module")
def grid_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("grid") / "tiny.json"
    path.write_text(json.dumps(TINY))
    path.with_name("one.json").write_text(json.dumps(ONE_PROGRAM))
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory, grid_file, cache_dir, digits_model):
    """An uninterrupted one-device run in this process: (results lines, the Sweeper with its compiled runners)."""
    out = tmp_path_factory.mktemp("ref")
    runner = sweep.Sweeper(cache_dir=cache_dir)
    records = sweep.run_sweep(grid_file, out, progress=False, sweeper=runner)
    assert len(records) == 4 and all(r is not None for r in records)
    return lines(out / sweep.RESULTS), runner


# ----------------------------------------------------------------------------- cells and ids

def test_expansion_is_the_product_with_stable_ids():
    cells = sweep.expand(TINY)
    assert len(cells) == 2 * 2
    assert len({c.id for c in cells}) == 4
    # the id is a property of the cell alone: key order, other cells and the grid's name do not matter
    shuffled = json.loads(json.dumps(TINY, sort_keys=True))
    shuffled["name"] = "other"
    shuffled["defenses"][0]["levels"] = [1e-2, 0.0, 1e-1]
    ids = {c.id for c in sweep.expand(shuffled)}
    assert {c.id for c in cells} < ids and len(ids) == 6
    assert cells[0].id == "dd993b5780a3cc26"  # golden: changing the canonical form re-runs every sweep
    d = cells[0].d
    assert d["attack"] == {"name": "nes", "config": {"eps": 0.3, "norm": "linf", "samples": 10}, "eot": 1}
    assert d["defense"] == {"name": "output_noise", "level": 0.0, "options": {}}
    assert (d["budget"], d["n_images"], d["seed"], d["targeted"]) == (440, 5, 0, True)
    # an int level and a float level are the same cell
    ints = copy.deepcopy(TINY)
    ints["defenses"][0]["levels"] = [0, 1e-2]
    assert [c.id for c in sweep.expand(ints)] == [c.id for c in cells]
    want = jax.random.fold_in(sweep.root_key(0), int(cells[1].id[:8], 16) & 0x7FFFFFFF)
    assert (jax.random.key_data(sweep.cell_key(cells[1])) == jax.random.key_data(want)).all()


def test_sizes_and_builtin_grids_expand():
    g = dict(TINY, smoke={"n_images": 2}, full={"seeds": [0, 1]})
    assert {c.d["n_images"] for c in sweep.expand(sweep.resolve(g, "smoke"))} == {2}
    assert len(sweep.expand(sweep.resolve(g, "full"))) == 8
    assert len(sweep.expand(sweep.resolve(g, "default"))) == 4
    for name, grid in grids.GRIDS.items():
        assert "table" in grid and "mirrors" in grid["table"], name
        usable = sweep.without_attacks(grid, sweep.missing_attacks(grid))
        for size in sweep.SIZES:
            resolved = sweep.resolve(usable, size)
            if resolved["attacks"]:
                cells = sweep.expand(resolved)
                assert cells, (name, size)
                sweep.plan(cells)  # every cell of every built-in table is valid before anything runs


def _reject(spec, norm):
    try:
        spec.config(norm=norm, eps=1.0)
    except (ValueError, TypeError):
        return True
    return False


def _bad_grids():
    """(case, grid, words the error must contain) — attack names with special support come from the registry."""
    cases = [
        ("unknown attack", dict(TINY, attacks=["no_such_attack"]), ["attacks[0]", "no_such_attack"]),
        ("unknown defense", dict(TINY, defenses=[{"name": "no_such_defense", "levels": [0.1]}]),
         ["defenses[0]", "no_such_defense"]),
        ("empty attacks", dict(TINY, attacks=[]), ["attacks", "empty"]),
        ("empty levels", dict(TINY, defenses=[{"name": "output_noise", "levels": []}]), ["defenses[0]", "levels"]),
        ("empty seeds", dict(TINY, seeds=[]), ["seeds", "empty"]),
        ("empty sweep axis", dict(TINY, attacks=[{"name": "nes", "sweep": {"beta": []}}]), ["attacks[0]", "beta"]),
        ("negative level", dict(TINY, defenses=[{"name": "output_noise", "levels": [-1.0]}]), ["defenses[0]", "sigma"]),
        ("unknown option", dict(TINY, attacks=[{"name": "nes", "config": {"not_an_option": 1}}]),
         ["nes", "not_an_option"]),
        ("bad attack config", dict(TINY, attacks=[{"name": "nes", "config": {"samples": 3}}]), ["nes", "samples"]),
        ("budget below one eot step", dict(TINY, attacks=[{"name": "nes", "config": {"samples": 10}, "eot": 50}]),
         ["nes", "budget 440", "eot 50"]),
        ("drop of a fixed defense", dict(TINY, defenses=[{"name": "quantize", "drops": [0.01]}]),
         ["defenses[0]", "quantize"]),
        ("unknown grid key", dict(TINY, atacks=["nes"]), ["atacks"]),
        ("unknown dataset", dict(TINY, datasets=["imagenet22k"]), ["datasets[0]", "imagenet22k"]),
    ]
    l2_only = [n for n, s in sorted(ATTACKS.items()) if _reject(s, "l2")]
    if l2_only:  # an attack whose config rejects the l2 norm
        name = l2_only[0]
        cases.append(("norm incompatible with attack", dict(TINY, attacks=[name], norm="l2", eps=2.0,
                                                            targeted=ATTACKS[name].supports_targeted),
                      [name, "l2"]))
    untargeted_only = [n for n, s in sorted(ATTACKS.items()) if not s.supports_targeted]
    if untargeted_only:
        cases.append(("targeted on an untargeted-only attack", dict(TINY, attacks=[untargeted_only[0]]),
                      [untargeted_only[0], "targeted"]))
    return cases


@pytest.mark.parametrize("case,grid,words", _bad_grids(), ids=[c[0] for c in _bad_grids()])
def test_bad_grids_fail_before_anything_runs(case, grid, words, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ValueError) as e:
        sweep.run_sweep(grid, out, progress=False)
    for w in words:
        assert w in str(e.value), (case, str(e.value))
    assert not out.exists()


def test_cli_rejects_a_bad_grid_with_exit_code_2(tmp_path, capsys):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(dict(TINY, attacks=["no_such_attack"])))
    with pytest.raises(SystemExit) as e:
        cli.main(["--grid", str(path), "--out", str(tmp_path / "o")])
    assert e.value.code == 2 and "no_such_attack" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_builtin_grid_with_an_unregistered_attack_names_it(tmp_path, monkeypatch):
    g = copy.deepcopy(grids.GRIDS["aithal_table7"])
    g["attacks"] = g["attacks"] + ["attack_not_written_yet"]
    monkeypatch.setitem(grids.GRIDS, "aithal_table7", g)
    with pytest.raises(ValueError, match="attack_not_written_yet"):
        sweep.run_sweep("aithal_table7", tmp_path / "o", progress=False)
    assert sweep.missing_attacks(g) == ["attack_not_written_yet"]


# ----------------------------------------------------------------------------- running

def test_records_follow_the_protocol(reference):
    ref, _ = reference
    recs = [json.loads(line) for line in ref]
    assert [r["id"] for r in recs] == [c.id for c in sweep.expand(TINY)]
    for r in recs:
        m = r["metrics"]
        assert m["n_images"] == 5 and len(r["images"]["queries"]) == 5
        assert all(q <= 440 for q in r["images"]["queries"])
        assert r["cost"] == 11 * r["cell"]["attack"]["eot"]
        assert 0 <= m["asr"] <= 1 and r["defended"]["acc_clean"] > 0.9
    # undefended NES succeeds; at sigma = 1e-2 it does not within 440 queries
    assert recs[0]["metrics"]["asr"] > recs[1]["metrics"]["asr"]


def test_eot_at_equal_total_queries_does_not_restore_undefended_asr(reference):
    ref, _ = reference
    recs = {(r["cell"]["attack"]["eot"], r["cell"]["defense"]["level"]): r for r in map(json.loads, ref)}
    undefended, adaptive = recs[1, 0.0], recs[5, 1e-2]
    assert undefended["metrics"]["asr"] >= 0.8
    assert adaptive["metrics"]["asr"] <= undefended["metrics"]["asr"] - 0.6
    # every repeat counts: M*(J+1) = 55 points per step, within the same 440-query budget
    assert adaptive["cost"] == 55 and all(q % 55 == 0 and q <= 440 for q in adaptive["images"]["queries"])


def test_sharded_equals_unsharded(reference, grid_file, cache_dir, tmp_path):
    ref, _ = reference
    out = tmp_path / "sharded"
    proc = run_cli(["--grid", str(grid_file.with_name("one.json")), "--out", str(out), "--cache-dir", str(cache_dir)],
                   env_extra={"XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"})
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr.decode()[-3000:]
    assert "on 4 device(s)" in stderr.decode()
    assert lines(out / sweep.RESULTS) == ref[:2]
    assert {json.loads(t)["devices"] for t in lines(out / sweep.TIMING)} == {4}


def test_sigkill_mid_run_then_resume_gives_the_uninterrupted_results(reference, grid_file, cache_dir, tmp_path):
    ref, runner = reference
    out = tmp_path / "killed"
    results = out / sweep.RESULTS
    proc = run_cli(["--grid", str(grid_file), "--out", str(out), "--cache-dir", str(cache_dir)])
    n_at_kill, deadline = None, time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        n = results.read_bytes().count(b"\n") if results.exists() else 0
        if 1 <= n < len(ref):
            proc.send_signal(signal.SIGKILL)
            n_at_kill = n
            break
        time.sleep(0.02)
    proc.communicate(timeout=60)
    assert n_at_kill is not None, f"the sweep was not caught mid-run (exit code {proc.returncode})"
    assert proc.returncode == -signal.SIGKILL
    before = sweep.read_results(results)  # tolerates a line torn by the kill
    assert 1 <= len(before) < len(ref)
    timed = (out / sweep.TIMING).read_bytes().count(b"\n") if (out / sweep.TIMING).exists() else 0
    # re-run the same sweep: only the missing cells run
    records = sweep.run_sweep(grid_file, out, progress=False, sweeper=runner)
    assert len(lines(out / sweep.TIMING)) - timed == len(ref) - len(before)
    assert [r["id"] for r in records] == [json.loads(x)["id"] for x in ref]
    done = by_id(lines(results))
    assert done == by_id(ref)  # no cell lost or duplicated; every value identical
    assert all(json.loads(done[rid]) == rec for rid, rec in before.items())


def test_partial_last_line_is_dropped_and_its_cell_rerun(reference, grid_file, tmp_path):
    ref, runner = reference
    out = tmp_path / "torn"
    out.mkdir()
    torn = "\n".join(ref[:2]) + "\n" + ref[2][: len(ref[2]) // 2]  # killed in the middle of writing line 3
    (out / sweep.RESULTS).write_text(torn)
    assert len(sweep.read_results(out / sweep.RESULTS)) == 2
    sweep.run_sweep(grid_file, out, progress=False, sweeper=runner)
    assert lines(out / sweep.RESULTS) == ref
    # and a finished sweep re-run changes nothing
    sweep.run_sweep(grid_file, out, progress=False, sweeper=runner)
    assert lines(out / sweep.RESULTS) == ref


def test_resume_trusts_only_complete_records(reference, grid_file, tmp_path):
    """Lines that are not complete records of their cell are moved aside with their reason and their cells run
    again; before, a bare ``{"id": ...}`` counted as done and later runs failed with a KeyError."""
    ref, runner = reference
    ids = [json.loads(x)["id"] for x in ref]
    out = tmp_path / "bad"
    out.mkdir()
    forged = json.loads(ref[1])
    forged["id"] = ids[2]  # a whole record filed under another cell's id
    cut = json.loads(ref[3])
    del cut["images"]["queries"]
    bad = [json.dumps({"id": ids[2]}), json.dumps(forged), "not json", json.dumps(cut), ref[0]]
    (out / sweep.RESULTS).write_text("\n".join([ref[0], bad[0], bad[1], ref[1], bad[2], bad[3], bad[4]]) + "\n")
    said = []
    records = sweep.run_sweep(grid_file, out, progress=False, sweeper=runner, log=said.append)
    assert lines(out / sweep.RESULTS) == ref  # the good lines kept as they were, the others' cells re-run in order
    assert records == [json.loads(x) for x in ref]
    assert all(sweep.check_record(r) is None for r in records)
    rejected = [json.loads(x) for x in lines(out / sweep.REJECTED)]
    assert [r["text"] for r in rejected] == bad and [r["line"] for r in rejected] == [2, 3, 5, 6, 7]
    reasons = [r["reason"] for r in rejected]
    assert "no 'label' field" in reasons[0] and "not the hash of its cell" in reasons[1]
    assert "not JSON" in reasons[2] and "images['queries']" in reasons[3] and "second record" in reasons[4]
    assert any("5 line(s) are not complete records" in s for s in said)
    assert "2 already done" in " ".join(said)


def test_two_runs_into_one_folder_run_each_cell_once(reference, grid_file, cache_dir, tmp_path):
    """A sweep process and this one into the same folder, the second started once the first has read the (empty)
    results: without claims both ran every cell (a duplicate line per cell); now each line appears once, identical
    to the reference, and ``sweep.json`` is whole."""
    ref, runner = reference
    out = tmp_path / "shared"
    other = run_cli(["--grid", str(grid_file.with_name("one.json")), "--out", str(out), "--cache-dir", str(cache_dir)])
    seen, deadline = b"", time.time() + 300
    while b"to run on" not in seen and time.time() < deadline and other.poll() is None:
        seen += other.stderr.readline()
    assert b"0 already done, 2 to run" in seen, seen.decode()[-3000:]
    records = sweep.run_sweep(grid_file.with_name("one.json"), out, progress=False, sweeper=runner)
    stdout, stderr = other.communicate(timeout=300)
    assert other.returncode == 0, (seen + stderr).decode()[-3000:]
    assert sorted(lines(out / sweep.RESULTS)) == sorted(ref[:2])  # each cell once, as in the reference run
    assert records == [json.loads(x) for x in ref[:2]]
    assert [c["id"] for c in json.loads((out / "sweep.json").read_text())["cells"]] == [json.loads(x)["id"]
                                                                                        for x in ref[:2]]
    assert sorted(json.loads(t)["id"] for t in lines(out / sweep.TIMING)) == sorted(json.loads(x)["id"]
                                                                                     for x in ref[:2])
    assert not (out / sweep.REJECTED).exists() and not [f for f in os.listdir(out) if f.endswith(".tmp")]


def test_cell_fields_are_dataclass_free_json():
    # sanity for the JSON layer: the canonical spec round-trips and Cell compares by spec only
    c = sweep.expand(TINY)[0]
    assert sweep.Cell.make(c.d).id == c.id
    assert dataclasses.replace(c, label="x") == c


def test_paper_table_names_unregistered_attacks(tmp_path, monkeypatch, capsys):
    from experiments import paper_tables

    g = copy.deepcopy(grids.GRIDS["aithal_table7"])
    g["attacks"] = g["attacks"] + ["attack_not_written_yet"]
    monkeypatch.setitem(grids.GRIDS, "aithal_table7", g)
    out = tmp_path / "t"
    with pytest.raises(SystemExit) as e:
        paper_tables.main(["--grid", "aithal_table7", "--smoke", "--out", str(out)])
    assert e.value.code == 2 and "attack_not_written_yet" in capsys.readouterr().err
    assert not out.exists()
    md = paper_tables.main(["--grid", "aithal_table7", "--smoke", "--out", str(out), "--skip-missing", "--render-only"])
    assert "Not registered yet (not run): attack_not_written_yet" in md
    assert (out / "table.md").read_text().strip() == md.strip() and (out / "table.csv").exists()
