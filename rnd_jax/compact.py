"""Stop paying for finished images: a scorer that runs its model on the live points only.

Under ``vmap`` the driver's loop runs its body for every image while any image goes on, and the
model is evaluated on the points of every image, finished or not. :func:`compacted` wraps a
scorer so that, under ``vmap``, each oracle call gathers the points that are really asked
(:func:`rnd_jax.oracle.live`: the images whose loop still runs, in the branch really taken) to the
front of one flat batch and evaluates the wrapped scorer on the smallest bucket that holds them:
``min_batch * 4^j`` points, or the whole batch. The buckets are branches of one ``lax.switch``
(so one program holds one copy of the wrapped scorer per bucket, and the branch is picked at run
time); a call with no live point evaluates nothing. Answers of points that are not live are zeros:
nothing reads them (the loop keeps those images' state).

Results are those of the unwrapped scorer, bit for bit, whenever the scorer's answer to a point
does not depend on the size of the batch it travels in: true of every built-in defense (a point's
noise comes from its own key) and of models whose kernels do not change with the batch size
(:func:`pointwise` makes any scorer so, at one model call per point). On the CPU a convolution's
kernels differ for batches of 1 and 2 points (last-bit differences); on some CPUs (AVX2) a matrix
product's rows differ between most batch sizes, so a compacted run can part from the plain one in
an attack that amplifies last bits. ``min_batch = 8`` by default. ``tests/test_compact.py`` checks
whole runs.

Use it around the most expensive part, the defended scorer an :class:`~rnd_jax.oracle.Oracle`
asks (``evaluate.make_runner(..., compact=True)`` does this). Outside ``vmap`` or outside a
driver loop it is the wrapped scorer. :func:`on_live` does the same for an attack's own per-image
work in a step (Square's re-draws), chunk by chunk with one copy of that work in the program.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.tree_util import Partial

from rnd_jax import oracle as _oracle
from rnd_jax import pytree

MIN_BATCH = 8
GROWTH = 4  # bucket sizes grow by this factor: fewer copies of the model, at most 4x the live points


def compacted(scorer, min_batch: int = MIN_BATCH):
    """``scorer`` evaluated on the live points only, in buckets of ``min_batch * 4^j`` (module docstring)."""
    if isinstance(min_batch, bool) or not isinstance(min_batch, int) or min_batch < 1:
        raise ValueError(f"min_batch must be an int >= 1, got {min_batch!r}")
    if not callable(scorer):
        raise ValueError(f"scorer must be callable (x, keys) -> scores, got {scorer!r}")
    return Partial(_compacted_scores, scorer, min_batch)


def _compacted_scores(scorer, min_batch, x, keys):
    pred = _oracle.live()
    if pred is None:
        return scorer(x, keys)
    arrays, static = pytree.partition(scorer)
    mask = jnp.broadcast_to(jnp.asarray(pred, bool), x.shape[:1])
    fn = _program(static, min_batch, keys is None)
    if keys is None:
        return fn(arrays, x, mask)
    return fn(arrays, x, mask, keys)


_PROGRAMS: dict = {}


def _program(static, min_batch: int, keyless: bool):
    """The custom-batched function ``(arrays, x, mask[, keys]) -> scores`` for one scorer structure."""
    cache_key = (static, min_batch, keyless)
    if cache_key in _PROGRAMS:
        return _PROGRAMS[cache_key]

    def on_live(arrays, x, mask, *keys):
        scorer = pytree.combine(arrays, static)
        with _oracle.outside_loops():  # the wrapped scorer sees only live points
            return _bucketed(scorer, min_batch, x, mask, keys[0] if keys else None)

    def plain(arrays, x, mask, *keys):  # a scorer that varies over the batch: no compaction
        return pytree.combine(arrays, static)(x, keys[0] if keys else None)

    fn = _flattened(on_live, plain)
    _PROGRAMS[cache_key] = fn
    return fn


def _bucketed(scorer, min_batch: int, x, mask, keys):
    """``scorer`` on the live rows of ``x`` gathered to the front, in the smallest bucket that holds them."""
    n_points = x.shape[0]
    sizes = []
    b = min_batch
    while b < n_points:
        sizes.append(b)
        b *= GROWTH
    sizes.append(n_points)
    order = jnp.argsort(jnp.logical_not(mask), stable=True)  # live points first, in their order
    xs = x[order]
    ks = None if keys is None else keys[order]
    n_live = jnp.sum(mask.astype(jnp.int32))
    out_shape = jax.eval_shape(lambda a, k: scorer(a, k), x[:1], None if keys is None else keys[:1])
    k_cls, dtype = out_shape.shape[-1], out_shape.dtype

    def nothing(xs, ks):
        return jnp.zeros((n_points, k_cls), dtype)

    def bucket(size):
        def run(xs, ks):
            out = scorer(xs[:size], None if ks is None else ks[:size])
            # a pad, not .at[:size].set: a full-slice scatter would capture an index array constant
            return out if size == n_points else jnp.pad(out, ((0, n_points - size), (0, 0)))
        return run

    branches = [nothing] + [bucket(s) for s in sizes]
    # no array constants in here: a custom_vmap body must not capture any (they would be batched consts)
    above = sum((n_live > s).astype(jnp.int32) for s in sizes[:-1])
    index = jnp.where(n_live == 0, 0, 1 + above)
    sorted_out = jax.lax.switch(index, branches, xs, ks)
    return jnp.zeros_like(sorted_out).at[order].set(sorted_out)


def on_live(fn, *args, chunk: int = MIN_BATCH, max_chunks: int = 8):
    """``fn(live, *args)`` for one image, computed under ``vmap`` for the live images only.

    An attack's own per-image work in a step (e.g. Square's re-draws) runs, like the model, for every
    image while any image goes on. Here, inside a driver loop under ``vmap``, the images whose points
    are really asked (:func:`rnd_jax.oracle.live`) are gathered to the front and ``fn`` runs, vmapped,
    on a chunk of them at a time, in a loop over as many chunks as hold the live images (one copy of
    ``fn`` in the program; a chunk holds ``max(chunk, ceil(batch / max_chunks))`` images); nested
    ``vmap`` axes are flattened into one batch. ``live`` (a bool) tells ``fn`` whether its image is
    live: the last chunk's other rows are padding, so ``fn``'s loops should end at once for them. The
    outputs of images that are not live are zeros (nothing reads them). Outside a driver loop (or
    ``vmap``) it is ``fn(True, *args)``. ``fn`` may be a pytree (a ``Partial`` holding a scorer): its
    array leaves are arguments of the gathered program, not captured constants. Results equal those of
    ``fn`` on every image bit for bit when ``fn`` computes each image's result the same in a batch of
    any size: integer and elementwise work, and models whose kernels do not change with the batch size
    (the same caveat as :func:`compacted`'s).
    """
    for name, v in (("chunk", chunk), ("max_chunks", max_chunks)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    pred = _oracle.live()
    if pred is None:
        return fn(jnp.ones((), bool), *args)
    leaves, tree = jax.tree_util.tree_flatten(args)
    fn_arrays, fn_static = pytree.partition(fn)  # fn's own arrays (a surrogate's weights) travel as arguments

    def run(arrays, live, *flat):
        return pytree.combine(arrays, fn_static)(live, *jax.tree_util.tree_unflatten(tree, flat))

    def core(arrays, mask, *flat):
        n = mask.shape[0]
        width = min(n, max(chunk, -(-n // max_chunks)))
        order = jnp.argsort(jnp.logical_not(mask), stable=True)  # live images first, in their order
        n_live = jnp.sum(mask.astype(jnp.int32))
        shapes = jax.eval_shape(run, arrays, mask[0], *(v[0] for v in flat))
        empty = jax.tree_util.tree_map(lambda o: jnp.zeros((n,) + o.shape, o.dtype), shapes)

        def body(c):
            i, out = c
            rows = i * width + jnp.arange(width)
            live = rows < n_live
            at = order[jnp.minimum(rows, n - 1)]  # only this chunk's images are gathered
            part = jax.vmap(run, in_axes=(None,) + (0,) * (1 + len(flat)))(arrays, live, *(v[at] for v in flat))
            to = jnp.where(live, at, n)  # padding rows write nowhere
            return i + 1, jax.tree_util.tree_map(lambda o, p_: o.at[to].set(p_, mode="drop"), out, part)

        n_chunks = (n_live + width - 1) // width
        return jax.lax.while_loop(lambda c: c[0] < n_chunks, body, (jnp.zeros((), jnp.int32), empty))[1]

    flat_fn = _flattened(core, core)
    out = flat_fn(fn_arrays, jnp.asarray(pred, bool)[None], *(v[None] for v in leaves))
    return jax.tree_util.tree_map(lambda o: o[0], out)


def pointwise(scorer):
    """``scorer`` answering every point through one and the same one-point program.

    XLA's CPU kernels for matrix products and convolutions depend on the batch size: a point's float32
    answer can differ in its last bits between a batch of 101 points and one of 1,010 (the digits CNN
    on AVX2, where 9 of 10 images' answers differ by up to 2 ulp). Attacks with small finite-difference
    steps divide such differences by the step, and sign steps turn them into different iterates, so an
    image attacked alone need not do exactly what it does inside a batch. Wrapped here, the answer is a
    function of the point (and its key) alone: under any number of ``vmap`` the points are flattened
    into one batch and answered one at a time by the same program (``lax.map``), so a run of one image
    asks bit-identical answers alone and in any batch. So is its gradient with respect to the points
    (one pullback per point: a transfer prior, a surrogate's white-box gradient); gradients do not reach
    the scorer's own arrays (its params get none). One model call per point: for replay checks and
    tests, not sweeps. A scorer whose own arrays vary over the batch is evaluated per image, without
    this guarantee.
    """
    if not callable(scorer):
        raise ValueError(f"scorer must be callable (x, keys) -> scores, got {scorer!r}")
    return Partial(_pointwise_scores, scorer)


def _pointwise_scores(scorer, x, keys):
    arrays, static = pytree.partition(scorer)
    fn = _pointwise_program(static, keys is None)
    return fn(arrays, x) if keys is None else fn(arrays, x, keys)


_POINTWISE: dict = {}


def _flattened(fn, per_image):
    """``fn(arrays, *per_point)`` under ``vmap``: the points of every image flattened into one call of ``fn``
    (unbatched arguments broadcast first). Where the arrays themselves vary over the batch, ``per_image``
    (same signature) is vmapped instead."""
    fn = jax.custom_batching.custom_vmap(fn)

    @fn.def_vmap
    def rule(axis_size, in_batched, arrays, *per_point):
        def full(v, batched):
            return v if batched else jnp.broadcast_to(v, (axis_size,) + v.shape)

        args = [full(v, b) for v, b in zip(per_point, in_batched[1:])]
        batched = lambda out: jax.tree_util.tree_map(lambda _: True, out)  # noqa: E731 (any output pytree)
        if any(jax.tree_util.tree_leaves(in_batched[0])):
            out = jax.vmap(per_image)(jax.tree_util.tree_map(full, arrays, in_batched[0]), *args)
            return out, batched(out)
        lead = args[0].shape[:2]
        out = fn(arrays, *(v.reshape((-1,) + v.shape[2:]) for v in args))
        out = jax.tree_util.tree_map(lambda o: o.reshape(lead + o.shape[1:]), out)
        return out, batched(out)

    return fn


def _pointwise_program(static, keyless: bool):
    """The custom-batched, differentiable ``(arrays, x[, keys]) -> scores`` for one scorer structure."""
    cache_key = (static, keyless)
    if cache_key in _POINTWISE:
        return _POINTWISE[cache_key]

    def one(arrays, p, k):  # the one-point program
        return pytree.combine(arrays, static)(p[None], None if k is None else k[None])[0]

    def one_at_a_time(f, *per_point):
        # a loop of at least two trips (a one-trip loop would be inlined into its caller and fused there)
        n = per_point[0].shape[0]
        if n == 1:
            per_point = [jnp.concatenate([v, v]) for v in per_point]
        return jax.lax.map(lambda a: f(*a), tuple(per_point))[:n]

    def answers(arrays, x, *keys):
        return one_at_a_time(lambda p, *k: one(arrays, p, k[0] if k else None), x, *keys)

    def pullbacks(arrays, x, ct, *keys):
        def pull(p, c, *k):
            return jax.vjp(lambda z: one(arrays, z, k[0] if k else None), p)[1](c)[0]
        return one_at_a_time(pull, x, ct, *keys)

    ask, pull = _flattened(answers, answers), _flattened(pullbacks, pullbacks)

    @jax.custom_vjp
    def fn(arrays, x, *keys):
        return ask(arrays, x, *keys)

    def fwd(arrays, x, *keys):
        return ask(arrays, x, *keys), (arrays, x, keys)

    def bwd(res, ct):
        arrays, x, keys = res
        return (None, pull(arrays, x, ct, *keys)) + (None,) * len(keys)

    fn.defvjp(fwd, bwd)
    _POINTWISE[cache_key] = fn
    return fn
