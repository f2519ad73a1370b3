"""Time-to-result machinery: compacted model calls, Square's vectorised re-draws, the compilation cache."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.tree_util import Partial

from rnd_jax import compile_cache, data, pytree
from rnd_jax.attacks import Context, make_attack
from rnd_jax.attacks.score import square as sq
from rnd_jax.compact import compacted, on_live, pointwise
from rnd_jax.defenses import model_scorer, output_noise
from rnd_jax.evaluate import Protocol, cell_inputs, image_keys, make_runner, select_images
from rnd_jax.oracle import Oracle, live_cond, live_while

RUN = pytree.jit(pytree.apply)


@pytest.mark.parametrize("name, sigma, budget", [
    ("nes", 0.0, 2_000), pytest.param("rays", 0.01, 400, marks=pytest.mark.slow)])  # rays: the same wrapper
def test_compacted_runs_are_bit_identical(digits_model, name, sigma, budget):
    """Whole cells with the model evaluated on live points only equal the plain cells bit for bit."""
    model, params = digits_model
    x, y = data.load("digits", "test")
    xt, yt = data.load("digits", "train")
    clean = model_scorer(model, params)
    sel = select_images(jax.random.key(3), clean, x, y, 6, True, 10)
    keys = image_keys(jax.random.key(4), jax.random.key(5), sel.index)
    attack = make_attack(name, Context(jnp.asarray(xt[:200]), jnp.asarray(yt[:200]), 10), eps=0.3)
    protocol = Protocol(n_images=6, targeted=True, budget=budget)
    outs = []
    for compact in (False, True):
        scorer = model_scorer(model, params, compact=compact)
        runner = make_runner(attack, Oracle(output_noise(scorer, sigma), attack.output), scorer, protocol)
        outs.append(jax.tree_util.tree_map(np.asarray, RUN(runner, *cell_inputs(sel, keys))))
    plain, packed = outs
    assert np.ptp(plain[0].queries) > 0  # images finish at different times: some calls are compacted
    for a, b in zip(jax.tree_util.tree_leaves(plain), jax.tree_util.tree_leaves(packed)):
        np.testing.assert_array_equal(a, b)


def test_compacted_scorer_sees_only_live_points():
    """Under vmap inside a loop, the wrapped scorer is evaluated on the live points of the batch only."""
    sizes = []

    def counting(x, keys):
        n = x.shape[0]  # static: the bucket this call was traced for
        jax.debug.callback(lambda: sizes.append(n))
        return jnp.stack([jnp.sum(x, axis=(1, 2, 3)), -jnp.sum(x, axis=(1, 2, 3))], -1)

    scorer = compacted(counting, min_batch=2)

    def one(x, n_steps):
        def body(c):
            i, acc = c
            return i + 1, acc + scorer(x[None] * (i + 1), None)[0]
        return live_while(lambda c: c[0] < n_steps, body, (jnp.zeros((), jnp.int32), jnp.zeros(2)))[1]

    steps = jnp.asarray([1] * 12 + [2] * 5 + [3] * 2 + [4])
    xs = jnp.ones((len(steps), 2, 2, 1))
    out = jax.jit(jax.vmap(one))(xs, steps)
    want = np.asarray([[4.0 * sum(range(1, int(n) + 1)), -4.0 * sum(range(1, int(n) + 1))] for n in steps])
    np.testing.assert_allclose(np.asarray(out), want)
    # buckets 2, 8 and all 20 points; live images per iteration: 20, 8, 3, 1
    assert sizes == [20, 8, 8, 2]
    with pytest.raises(ValueError, match="min_batch"):
        compacted(counting, min_batch=0)


def test_live_cond_keeps_a_scorers_arrays_whole_so_its_queries_are_compacted():
    """A query inside ``live_cond`` on a per-image predicate reaches the compacted scorer with the scorer's
    own arrays unbatched (a ``lax.cond`` would copy them per image, and the scorer would then run per image
    on every point): it is evaluated on the live points only, and answers what the scorer alone answers."""
    sizes = []

    def counting(w, x, keys):
        n = x.shape[0]
        jax.debug.callback(lambda: sizes.append(n))
        s = jnp.sum(x, axis=(1, 2, 3)) * w
        return jnp.stack([s, -s], -1)

    scorer = compacted(Partial(counting, jnp.float32(3.0)), min_batch=2)

    def one(x, n_steps):
        def body(c):
            i, acc = c
            ask = (i % 2 == 0) | (n_steps == 1)  # a per-image predicate: the even steps, every step of the 1-step images
            got = live_cond(ask, lambda: scorer(x[None] * (i + 1), None)[0], lambda: jnp.full((2,), 0.5))
            return i + 1, acc + got
        return live_while(lambda c: c[0] < n_steps, body, (jnp.zeros((), jnp.int32), jnp.zeros(2)))[1]

    steps = np.asarray([1] * 12 + [2] * 5 + [3] * 2 + [4])
    xs = jnp.ones((len(steps), 2, 2, 1))
    out = jax.jit(jax.vmap(one))(xs, jnp.asarray(steps))
    want = [sum(12.0 * (i + 1) if (i % 2 == 0 or n == 1) else 0.5 for i in range(n)) for n in steps]
    np.testing.assert_allclose(np.asarray(out)[:, 0], want)
    # step 0: all 20 images ask (bucket 20); step 1 asks nothing (no image live in the branch: no call);
    # step 2: the 3 images with 3 or 4 steps (bucket 8); step 3 asks nothing
    assert sizes == [20, 8], sizes


def _sequential_tries(cfg, draw, rep, state):
    """Square's re-draws one by one, as the loop of tries defines them (the witness)."""
    for t in range(cfg.max_tries):
        cand, s = draw(state, jnp.int32(t))
        if not bool(rep(state, cand)) or t + 1 == cfg.max_tries:
            return np.asarray(cand), int(s), t + 1


def test_pointwise_answers_and_gradients_do_not_depend_on_the_batch(digits_model, digits_test):
    """A point's answer and its gradient through ``pointwise`` are the same bits alone, in a batch and under
    nested vmaps (the plain model's need not be: XLA's CPU kernels change with the batch size), and equal
    the plain scorer's to float32 rounding; its noise comes from the point's own key."""
    model, params = digits_model
    plain = model_scorer(model, params)
    x = jnp.asarray(digits_test[0][:12])
    keys = jax.random.split(jax.random.key(0), 12)
    grad_of = lambda s: lambda p, k: jax.grad(lambda z: jnp.log(s(z[None], k[None])[0, 3]))(p)  # noqa: E731
    for s in (pointwise(plain), output_noise(pointwise(plain), 1e-3), pointwise(output_noise(plain, 1e-3))):
        one = jax.jit(lambda p, k: s(p[None], k[None])[0])
        alone = np.stack([np.asarray(one(x[i], keys[i])) for i in range(12)])
        np.testing.assert_array_equal(np.asarray(jax.jit(s)(x, keys)), alone)
        nested = jax.jit(jax.vmap(jax.vmap(one)))(x.reshape((3, 4) + x.shape[1:]), keys.reshape(3, 4))
        np.testing.assert_array_equal(np.asarray(nested).reshape(alone.shape), alone)
        g = grad_of(s)
        g_alone = np.stack([np.asarray(jax.jit(g)(x[i], keys[i])) for i in range(12)])
        np.testing.assert_array_equal(np.asarray(jax.jit(jax.vmap(g))(x, keys)), g_alone)
    np.testing.assert_allclose(np.asarray(jax.jit(pointwise(plain))(x, None)), np.asarray(plain(x, None)),
                               rtol=1e-5, atol=1e-7)
    g_plain = np.asarray(jax.jit(jax.vmap(grad_of(plain)))(x, keys))
    np.testing.assert_allclose(np.asarray(jax.jit(jax.vmap(grad_of(pointwise(plain))))(x, keys)), g_plain,
                               rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError):
        pointwise("not a scorer")


def test_square_vectorised_redraws_equal_the_tries_one_by_one():
    """The chunked l_inf draws pick the same proposal as drawing the tries one by one, also when every try
    repeats. (l_2 proposals are still drawn one per iteration: vmapped window sums may round differently.)"""
    cfg = sq.SquareLinfConfig(eps=0.3, max_tries=20, memory=32)
    x0 = jnp.asarray(data.load("digits", "test")[0][:1][0])
    key = jax.random.key(7)
    x = jnp.clip(x0 + 0.3 * jax.random.rademacher(key, x0.shape, jnp.float32), 0, 1)
    k, p = jax.random.key(11), jnp.float32(0.05)
    base = sq.SquareState(x, x0, jnp.float32(1.0), jnp.int32(0), key, jnp.int32(5), jnp.bool_(False),
                          jnp.zeros((cfg.memory, 2), jnp.uint32), jnp.int32(0))
    vectorised = jax.jit(lambda st: sq.draw_distinct(cfg, st, k, p))
    draw = jax.jit(lambda st, t: sq.draw_proposal(cfg, st, k, p, t))
    rep = jax.jit(sq.repeats)
    known, last_tries = [], 0  # hashes of the points chosen so far, as the step itself computed them
    while last_tries < cfg.max_tries:  # each round remembers the last choice: the next must come later
        seen = np.zeros((cfg.memory, 2), np.uint32)
        if known:
            seen[:len(known)] = known
        state = base._replace(seen=jnp.asarray(seen), n_seen=jnp.int32(len(known)))
        cand, s, tries = (np.asarray(v) for v in vectorised(state))
        ref_cand, ref_s, ref_tries = _sequential_tries(cfg, draw, rep, state)
        assert int(tries) == ref_tries and int(s) == ref_s
        assert int(tries) > last_tries or int(tries) == cfg.max_tries
        np.testing.assert_array_equal(cand, ref_cand)  # elementwise: the same bits in any compiled context
        known.append(np.asarray(sq.point_hash(jnp.asarray(cand))))
        last_tries = int(tries)
    assert len(known) >= 5  # several rounds, the last one with every try repeating


def test_on_live_runs_the_live_images_only_and_equals_every_image():
    """Under vmap in a driver-style loop, ``on_live`` evaluates ``fn`` on the live images (in chunks, with
    padding rows told they are not live) and gives each live image what ``fn`` alone gives it."""
    rows = []

    def fn(live, x, k):
        jax.debug.callback(lambda v: rows.append(bool(v)), live)
        return jnp.where(live, x * 2 + jax.random.uniform(k), -1.0)

    def one(x, k, n, chunk):
        def body(c):
            i, acc = c
            return i + 1, acc + on_live(fn, acc, jax.random.fold_in(k, i), chunk=chunk, max_chunks=100)
        return live_while(lambda c: c[0] < n, body, (jnp.zeros((), jnp.int32), x))[1]

    steps = np.asarray([1] * 12 + [2] * 5 + [3] * 2 + [4])
    xs, ks = jnp.arange(20.0), jax.random.split(jax.random.key(0), 20)
    expect = []
    for i in range(20):  # the witness: each image alone, eagerly
        acc = xs[i]
        for j in range(int(steps[i])):
            acc = acc + acc * 2 + jax.random.uniform(jax.random.fold_in(ks[i], j))
        expect.append(float(acc))
    out = jax.jit(jax.vmap(lambda x, k, n: one(x, k, n, 2)))(xs, ks, jnp.asarray(steps))
    jax.effects_barrier()
    np.testing.assert_allclose(np.asarray(out), expect, rtol=1e-6)
    # 20, 8, 3 and 1 live images in chunks of 2: 20 + 8 + 4 + 2 rows, not 4 steps x 20 images
    assert len(rows) == 34 and sum(rows) == int(steps.sum())
    nested = jax.jit(jax.vmap(jax.vmap(lambda x, k, n: one(x, k, n, 3))))(
        xs.reshape(4, 5), ks.reshape(4, 5), jnp.asarray(steps).reshape(4, 5))
    np.testing.assert_allclose(np.asarray(nested).reshape(-1), expect, rtol=1e-6)
    assert float(on_live(fn, xs[0], ks[0])) == float(xs[0] * 2 + jax.random.uniform(ks[0]))  # outside loops
    with pytest.raises(ValueError, match="chunk"):
        on_live(fn, xs[0], ks[0], chunk=0)


def test_square_redraws_on_live_images_only_keep_whole_runs_bit_identical(digits_model, monkeypatch):
    """Square l_inf with its re-draws computed for the live images only equals the run that draws them for
    every image, bit for bit, under output noise with a small memory (every try repeats, points evicted)."""
    model, params = digits_model
    x, y = data.load("digits", "test")
    clean = model_scorer(model, params)
    sel = select_images(jax.random.key(3), clean, x, y, 12, True, 10)
    keys = image_keys(jax.random.key(4), jax.random.key(5), sel.index)
    attack = make_attack("square_linf", None, eps=0.3, memory=48, max_tries=12)
    protocol = Protocol(n_images=12, targeted=True, budget=400)
    outs, traced = [], []

    def every_image(fn, *a, **kw):
        traced.append(True)
        return fn(jnp.ones((), bool), *a)

    for plain in (False, True):
        if plain:  # every image draws its tries, as without compaction (a new program: traced again)
            monkeypatch.setattr(sq.compact, "on_live", every_image)
        scorer = model_scorer(model, params, compact=True)
        runner = make_runner(attack, Oracle(output_noise(scorer, 0.02), attack.output), scorer, protocol)
        res = pytree.jit(lambda r, *a: pytree.apply(r, *a))(runner, *cell_inputs(sel, keys))  # its own program
        outs.append(jax.tree_util.tree_map(np.asarray, res))
    assert traced and np.ptp(outs[0][0].queries) > 0 and np.max(outs[0][0].queries) > 48  # finished apart
    for a, b in zip(jax.tree_util.tree_leaves(outs[0]), jax.tree_util.tree_leaves(outs[1])):
        np.testing.assert_array_equal(a, b)


def test_time_to_result_counts_a_score_attack_and_skips_the_host_run_of_a_white_box_one(digits_model, tmp_path):
    """The benchmark end to end (its own process: it clears JAX's caches): Square's host-counted run spends
    the driver's queries; PGD, which needs gradients, runs without one."""
    out = tmp_path / "ttr.json"
    cmd = [sys.executable, "-m", "benchmarks.time_to_result", "--attacks", "square_linf", "pgd", "--n-images", "4",
           "--sigmas", "0.01", "--budget", "60", "--repeats", "1", "--no-progress", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=Path(__file__).parent.parent)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {r["attack"]: r for r in json.loads(out.read_text())["rows"]}
    sq_row, pgd = rows["square_linf"], rows["pgd"]
    assert sq_row["host_queries_match"] and 0 < sq_row["calls_slowest"] <= sq_row["calls"]
    assert sq_row["bound_s"] > 0 and sq_row["wall_s"] > 0 and sq_row["queries_mean"] <= 60
    assert "calls" not in pgd and "gradients" in pgd["host"] and pgd["wall_s"] > 0


def test_compile_cache_folder_and_switch(tmp_path, monkeypatch):
    monkeypatch.setenv("RND_JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(compile_cache.ENV, raising=False)
    assert compile_cache.default_dir() == tmp_path / "cache" / "xla"
    monkeypatch.setenv(compile_cache.ENV, "off")
    assert compile_cache.default_dir() is None and compile_cache.enable() is None
    monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "elsewhere"))
    before = jax.config.jax_compilation_cache_dir
    try:
        folder = compile_cache.enable()
        assert folder == tmp_path / "elsewhere" and folder.is_dir()
        assert jax.config.jax_compilation_cache_dir == str(folder)
        with pytest.raises(ValueError, match="min_compile_s"):
            compile_cache.enable(min_compile_s=-1)
        (tmp_path / "file").write_text("")
        with pytest.raises(ValueError, match="cannot be created"):
            compile_cache.enable(tmp_path / "file" / "sub")
    finally:
        jax.config.update("jax_compilation_cache_dir", before)
