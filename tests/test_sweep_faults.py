"""Sweeps that fail early or not at all: everything a run could trip over mid-way is refused by ``plan`` /
``--dry-run``, and two runs into one folder run and write each cell once.

- bad grids of every kind (int32 budgets, seeds, image counts, wrong types, bools for numbers and numbers
  for bools, malformed ``smoke`` / ``table`` blocks, names that would leave the results folder) raise a
  ``ValueError`` naming the entry before anything is created; the CLIs exit 2;
- image counts: against the trained model's correctly classified images (exactly as the run selects them),
  or, before the model is trained, against the test split, saying so;
- (two runs into one ``--out``: tests/test_sweep.py, beside the compiled reference run);
- atomic writes: many concurrent writers of one file leave it whole.
"""

import json
import os
import threading

import pytest

from experiments import paper_tables
from experiments import sweep as cli
from rnd_jax import sweep

BASE = {"name": "faults", "attacks": [{"name": "nes", "config": {"samples": 10}}],
        "defenses": [{"name": "output_noise", "levels": [0.0, 1e-2]}], "norm": "linf", "eps": 0.3,
        "targeted": True, "budgets": [440], "n_images": 5, "acc_draws": 2}


def with_(**kw):
    return {**BASE, **kw}


BAD = [  # (case, grid, words the message must hold); each passed expand + plan before these checks
    ("budget beyond int32", with_(budgets=[2**31]), ["budgets", "2147483648"]),
    ("budget + one step beyond int32", with_(budgets=[2**31 - 5]), ["budget 2147483643", "int32"]),
    ("scaled eot budget beyond int32", with_(budgets=[2**30], eot_budget="scaled",
                                             attacks=[{"name": "nes", "config": {"samples": 10}, "eot": [4]}]),
     ["eot 4", "int32"]),
    ("seed beyond int32", with_(seeds=[2**40]), ["seeds", str(2**40)]),
    ("more images than the test split", with_(n_images=361), ["n_images 361", "360"]),
    ("balanced, too few of a class", with_(n_images=380, pool="all", balanced=True), ["class", "balanced"]),
    ("attacks as a string", with_(attacks="nes"), ["'attacks' must be a list"]),
    ("defenses as a string", with_(defenses="none"), ["'defenses' must be a list"]),
    ("a non-string model name", with_(datasets=[{"dataset": "digits", "model": ["digits_cnn"]}]),
     ["datasets[0]", "model"]),
    ("a non-string norm", with_(norm=["linf"]), ["norm"]),
    ("a non-string label", with_(attacks=[{"name": "nes", "config": {"samples": 10}, "label": 5}]),
     ["attacks[0]", "label"]),
    ("a bool level", with_(defenses=[{"name": "output_noise", "levels": [True]}]), ["defenses[0]", "True"]),
    ("a string level", with_(defenses=[{"name": "output_noise", "levels": ["0.1"]}]), ["defenses[0]", "'0.1'"]),
    ("a bool inside a number option", with_(defenses=[{"name": "input_noise", "levels": [0.1],
                                                       "options": {"scale": [True, 2.0]}}]), ["scale", "bool"]),
    ("a bool for a number defense option", with_(defenses=[{"name": "correlated_noise", "levels": [0.1],
                                                            "sweep": {"sigma": [True]}}]), ["sigma", "bool"]),
    ("smoke block not a dict", with_(smoke=["n_images", 2]), ["'smoke' must be a dict"]),
    ("unknown key in the full block", with_(full={"n_image": 2}), ["n_image", "'full' block"]),
    ("nested smoke block", with_(smoke={"smoke": {"n_images": 2}}), ["smoke", "'smoke' block"]),
    ("table not a dict", with_(table="aithal"), ["table", "dict"]),
    ("table rows not a list", with_(table={"rows": "attack"}), ["table", "rows"]),
    ("table values not strings", with_(table={"values": [1]}), ["table", "values"]),
    ("unknown table key", with_(table={"row": ["attack"]}), ["table", "row"]),
    ("a grid name with a separator", with_(name="../elsewhere"), ["../elsewhere", "outside"]),
    ("an absolute grid name", with_(name="/tmp/x"), ["/tmp/x", "outside"]),
    ("a grid name '..'", with_(name=".."), ["'..'", "outside"]),
    ("a label with a separator", with_(attacks=[{"name": "nes", "config": {"samples": 10}, "label": "a/b"}]),
     ["attacks[0]", "a/b"]),
    ("a defense label '..'", with_(defenses=[{"name": "output_noise", "levels": [0.1], "label": ".."}]),
     ["defenses[0]", "'..'"]),
    ("a description that is not a string", with_(description=["x"]), ["description"]),
]


@pytest.mark.parametrize("case,grid,words", BAD, ids=[b[0] for b in BAD])
def test_plan_refuses_what_would_fail_mid_run(case, grid, words, tmp_path):
    with pytest.raises(ValueError) as e:
        size = "smoke" if "smoke" in grid and isinstance(grid["smoke"], dict) else "default"
        sweep.plan(sweep.expand(sweep.resolve(grid, size)))
    for w in words:
        assert w in str(e.value), (case, str(e.value))


def test_dry_run_exits_2_naming_the_problem(tmp_path, capsys):
    path = tmp_path / "g.json"
    path.write_text(json.dumps(with_(defenses=[{"name": "output_noise", "levels": [True]}])))
    with pytest.raises(SystemExit) as e:
        cli.main(["--grid", str(path), "--dry-run"])
    assert e.value.code == 2 and "defenses[0]" in capsys.readouterr().err
    path.write_text(json.dumps(with_(name="../up")))
    with pytest.raises(SystemExit) as e:
        cli.main(["--grid", str(path), "--out", str(tmp_path / "o")])
    assert e.value.code == 2 and "outside" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and not (tmp_path.parent / "up").exists()


def test_image_count_against_the_trained_model(digits_model, cache_dir, tmp_path):
    """353 of the 360 test images are correctly classified: 354 fits the split but not the model."""
    from rnd_jax import data
    from rnd_jax.evaluate import predict

    model, params = digits_model
    x, y = data.load("digits", "test")
    from rnd_jax.defenses import model_scorer

    n_correct = int((predict(model_scorer(model, params), x) == y).sum())
    assert n_correct < len(y)
    cells = sweep.expand(with_(n_images=n_correct + 1))
    notes = []
    sweep.plan(cells, log=notes.append)  # no model at hand: the split bounds it, and a note says so
    assert len(notes) == 1 and "not trained yet" in notes[0] and "360 test images" in notes[0]
    runner = sweep.Sweeper(cache_dir=cache_dir)
    assert runner.has_model(cells[0].d)
    with pytest.raises(ValueError, match=f"only {n_correct} correctly classified"):
        sweep.plan(cells, sweeper=runner)
    sweep.plan(sweep.expand(with_(n_images=n_correct)), sweeper=runner)
    missing = sweep.Sweeper(cache_dir=tmp_path / "empty")
    notes = []
    sweep.plan(cells, sweeper=missing, log=notes.append)  # not in this cache: not trained by a dry run
    assert notes and not (tmp_path / "empty").exists()


def test_paper_table_refuses_a_bad_table_value_before_running(tmp_path, capsys):
    path = tmp_path / "t.json"
    path.write_text(json.dumps(with_(table={"rows": ["attack"], "values": ["asr@1k"]})))
    out = tmp_path / "t"
    with pytest.raises(SystemExit) as e:
        paper_tables.main(["--grid", str(path), "--out", str(out)])
    assert e.value.code == 2 and "asr@1k" in capsys.readouterr().err
    assert not out.exists()
    assert paper_tables.parse_at("robust_all_stop@1000xM") == ("robust_all_stop", "asr_stop", True, 1000, True)


def test_check_record_accepts_only_complete_records():
    assert sweep.check_record({"id": "abc"}) == "no 'label' field"
    assert "not a JSON object" in sweep.check_record([1])
    cell = sweep.expand(BASE)[0]
    rec = {"id": cell.id, "label": cell.label, "cell": cell.d, "level": 0.0, "calibration": None,
           "attack_config": {}, "cost": 11, "defended": dict.fromkeys(sweep.DEFENDED_FIELDS, 1.0),
           "metrics": {**dict.fromkeys(sweep.METRIC_FIELDS, 0.5), "n_images": 2},
           "images": {k: [0, 0] for k in ("queries", "success", "success_stop", "success_lucky", "success_clean")}}
    assert sweep.check_record(rec) is None
    assert "hash of its cell" in sweep.check_record({**rec, "cell": {**cell.d, "budget": 441}})
    assert "images['queries']" in sweep.check_record({**rec, "images": {**rec["images"], "queries": [0]}})
    assert "'cost'" in sweep.check_record({**rec, "cost": True})


def test_atomic_writes_never_tear(tmp_path):
    """Threads rewriting ``sweep.json`` at once: every write succeeds, every read sees one writer's whole text, and
    no temporary file remains (with one shared temporary name, writes failed and reads saw torn files)."""
    path = tmp_path / "sweep.json"
    objs = [{"writer": i, "pad": "x" * 20000} for i in range(4)]
    texts = [json.dumps(o, indent=1, sort_keys=True) + "\n" for o in objs]
    seen, errors, stop = [], [], threading.Event()

    def write(obj):
        for _ in range(50):
            try:
                sweep._write_json(path, obj)
            except OSError as e:
                errors.append(e)

    def read():
        while not stop.is_set():
            if path.exists():
                seen.append(path.read_text())

    reader = threading.Thread(target=read)
    reader.start()
    writers = [threading.Thread(target=write, args=(o,)) for o in objs]
    for w in writers:
        w.start()
    for w in writers:
        w.join()
    stop.set()
    reader.join()
    assert not errors
    assert seen and all(s in texts for s in seen)
    assert path.read_text() in texts and os.listdir(tmp_path) == ["sweep.json"]
