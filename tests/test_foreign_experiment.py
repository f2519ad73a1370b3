"""Experiments on models researchers have: a scikit-learn model through a host callback, and imported
weights of a standard architecture on CIFAR-10 files (both end to end, offline)."""

import json
import pickle

import jax.numpy as jnp
import numpy as np
import pytest

from experiments import foreign_model
from experiments import nes_vs_output_noise as nes_exp
from rnd_jax import artifacts, models, weights


def test_foreign_model_smoke_counts_agree(tmp_path):
    out = tmp_path / "o"
    foreign_model.main(["--smoke", "--attacks", "square_linf", "--out", str(out), "--no-progress"])
    res = json.loads((out / "results.json").read_text())
    assert [r["sigma"] for r in res["rows"]] == [0.0, 0.01]
    for r in res["rows"]:
        assert r["host_queries"] == r["driver_queries"] > 0
        assert r["host_eval_queries"] == 10 * r["n_images"]  # 9 success checks + 1 clean prediction per image
    assert res["rows"][0]["asr"] > 0  # Square fools the undefended MLP
    for f in ("results.csv", "asr.png", "timing.json"):
        assert (out / f).stat().st_size > 0
    for r in res["rows"]:  # each row's artifact agrees with the row
        a = artifacts.read(foreign_model.artifact_file(out, r["attack"], r["sigma"]))
        assert float(a["success"].mean()) == r["asr"] and float(a["success_lucky"].mean()) == r["asr_lucky"]
        assert a["x_adv"].shape == (r["n_images"], 8, 8, 1) and a["scores_clean"].shape == (r["n_images"], 10)


@pytest.mark.parametrize("argv", [["--attacks", "nope"], ["--attacks", "nes_pi"], ["--sigmas", "-1"],
                                  ["--budget", "0"], ["--eps", "-1"]])
def test_foreign_model_bad_options_exit_2(argv, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        foreign_model.cli(foreign_model.main, argv + ["--out", str(tmp_path / "o")])
    assert e.value.code == 2
    assert "error" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def _random_state_dict(model, shape):
    """Random weights in PyTorch naming (positive BN variances), as a RobustBench/torchvision file holds."""
    rng = np.random.default_rng(0)
    sd = {}
    for k, s in weights.expected_state_dict_shapes(model, shape).items():
        if k.endswith("running_var"):
            sd[k] = rng.uniform(0.5, 1.5, s).astype(np.float32)
        elif len(s) > 1:
            sd[k] = (rng.standard_normal(s) / np.sqrt(np.prod(s[1:]))).astype(np.float32)
        else:
            sd[k] = (1.0 if k.endswith(".weight") else 0.0) + 0.1 * rng.standard_normal(s).astype(np.float32)
    return sd


def test_cifar10_protocol_with_imported_weights(tmp_path):
    from safetensors.numpy import save_file

    model = models.get_model("resnet20", 10)
    sd = _random_state_dict(model, (32, 32, 3))
    path = tmp_path / "resnet20.safetensors"
    save_file(sd, str(path))
    params = weights.import_params(model, sd, (32, 32, 3))
    images = (np.arange(6 * 3072).reshape(6, 32, 32, 3) * 7 % 256).astype(np.uint8)
    labels = np.asarray(jnp.argmax(model.apply({"params": params}, jnp.asarray(images / 255.0, jnp.float32)), -1))
    folder = tmp_path / "data" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rows = images.transpose(0, 3, 1, 2).reshape(6, 3072)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": rows, b"labels": labels.tolist(), b"batch_label": name.encode()}, f, protocol=2)
    out = tmp_path / "o"
    nes_exp.main(["--dataset", "cifar10", "--model", "resnet20", "--weights", str(path), "--data-dir",
                  str(tmp_path / "data"), "--n-images", "2", "--max-queries", "102", "--sigmas", "0",
                  "--acc-draws", "1", "--eps", "0.0314", "--no-targeted", "--out", str(out), "--no-progress"])
    res = json.loads((out / "results.json").read_text())
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["train"] == {"weights": str(path)} and cfg["model"] == "resnet20"
    row = res["rows"][0] if "rows" in res else res[0]
    assert row["acc_clean"] == 1.0  # the labels are the imported model's own classes


@pytest.mark.parametrize("argv", [["--weights", "/nonexistent/w.pt"], ["--dataset", "imagenet"],
                                  ["--dataset", "imagenet", "--weights", __file__]])
def test_weights_and_imagenet_options_fail_fast(argv, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        nes_exp.main(argv + ["--out", str(tmp_path / "o")])
    assert e.value.code == 2
    assert "error" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_foreign_model_budget_below_one_step_exits_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        foreign_model.cli(foreign_model.main, ["--attacks", "hsja", "--budget", "100", "--out", str(tmp_path / "o")])
    assert e.value.code == 2 and "smaller than one step" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
