"""What the benchmarks share: their common options, their checks, and the model, data and context they load."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import jax.numpy as jnp

from experiments.common import dataset_info, resolve_model, write_error
from rnd_jax import compile_cache, data, train
from rnd_jax.attacks import ATTACKS, Context
from rnd_jax.attacks.registry import SURROGATE_OFFSETS
from rnd_jax.defenses import check_level, model_scorer


def add_args(p, sigmas=(0.0,), repeats: int = 3) -> None:
    """``--attacks --dataset --model --n-images --sigmas --repeats --out --no-progress``."""
    p.add_argument("--attacks", nargs="+", default=None, help=f"default: all registered ({', '.join(sorted(ATTACKS))})")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--model", default=None)
    p.add_argument("--n-images", type=int, default=100)
    p.add_argument("--sigmas", type=float, nargs="+", default=list(sigmas), help="output-noise levels (probabilities)")
    p.add_argument("--repeats", type=int, default=repeats, help="timed runs (the best is kept)")
    p.add_argument("--out", default=None, help="optional JSON file for the numbers")
    p.add_argument("--no-progress", action="store_true", help="no progress bar while a model trains")


def check_out_file(path) -> Path:
    """``ValueError`` unless ``path`` can be written as a file: not a folder, in an existing writable
    folder (:func:`experiments.common.write_error`); ``path`` itself is not touched."""
    out = Path(path).expanduser()
    if out.is_dir():
        raise ValueError(f"--out {str(path)!r} is a folder; give a JSON file name")
    folder = out.parent
    if not folder.is_dir():
        raise ValueError(f"--out {str(path)!r}: its folder {str(folder)!r} does not exist or is not a folder")
    e = write_error(folder)
    if e is not None:
        raise ValueError(f"--out {str(path)!r}: cannot write in {str(folder)!r} ({e.strerror or e})")
    return out


def configure(args, counts=("n_images", "repeats")) -> dict:
    """Validate the shared options before any model is trained or timed (``ValueError`` naming the option).

    ``counts``: the int options that must be positive."""
    names = args.attacks or sorted(ATTACKS)
    bad = [n for n in names if n not in ATTACKS]
    if bad:
        raise ValueError(f"unknown attack(s) {bad}; choose from {sorted(ATTACKS)}")
    for name in counts:
        v = getattr(args, name)
        if v < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive int, got {v}")
    sigmas = [check_level("sigma", s) for s in args.sigmas]
    ds = dataset_info(args.dataset, args)
    model_name = resolve_model(args, ds)  # unknown, or not built for the dataset's images: ValueError
    if args.out is not None:
        check_out_file(args.out)
    return {"names": names, "sigmas": sigmas, "ds": ds, "model": model_name}


def parse(parser, configure_fn, argv=None):
    """``(args, checked)``: the parsed options and ``configure_fn(args)``; a ``ValueError`` is a usage error."""
    args = parser.parse_args(argv)
    try:
        return args, configure_fn(args)
    except ValueError as e:
        parser.error(str(e))


def load(args, c: dict, compact: bool = False) -> SimpleNamespace:
    """The benchmark's model, clean scorer, test split and attack context (a surrogate, Subspace's
    reference models or the autoencoder if an attack needs them), trained or loaded from the checkpoint cache; the persistent compilation cache on."""
    compile_cache.enable()
    show = not args.no_progress
    model, params = train.load_or_train(c["model"], args.dataset, train.TrainConfig(), progress=show)
    x_test, y_test = data.load(args.dataset, "test")
    x_train, y_train = data.load(args.dataset, "train")
    surrogate = None
    if any("surrogate" in ATTACKS[n].needs for n in c["names"]):
        s_model, s_params = train.load_or_train(c["model"], args.dataset, train.TrainConfig(seed=1), progress=show)
        surrogate = model_scorer(s_model, s_params)
    surrogates = None
    if any("surrogates" in ATTACKS[n].needs for n in c["names"]):  # Subspace's references
        refs = [train.load_or_train(c["model"], args.dataset, train.TrainConfig(seed=o), progress=show)
                for o in SURROGATE_OFFSETS]
        surrogates = tuple(model_scorer(m, p) for m, p in refs)
    decoder = None
    if any("autoencoder" in ATTACKS[n].needs for n in c["names"]):
        from rnd_jax import autoencoder as ae
        decoder = ae.load_decoder(args.dataset, progress=show)
    ctx = Context(jnp.asarray(x_train), jnp.asarray(y_train), c["ds"].num_classes, surrogate, surrogates=surrogates,
                  autoencoder=decoder)
    return SimpleNamespace(model=model, params=params, clean=model_scorer(model, params, compact=compact),
                           x_test=x_test, y_test=y_test, ctx=ctx)
