"""JAX's persistent compilation cache, under the rnd_jax cache folder.

A compiled program is stored on disk keyed by its HLO, the backend and the compile options, so a
second run of the same experiment, sweep or benchmark loads its programs instead of compiling them
again (tracing and lowering still run; see ``benchmarks.time_to_result`` for what that costs).

The experiments, the sweep runner and the benchmarks call :func:`enable` at the top. The folder is
``$RND_JAX_COMPILE_CACHE`` if set (``0`` / ``off`` / ``none`` turns the cache off), else ``xla/``
under :func:`rnd_jax.train.default_cache_dir` (``$RND_JAX_CACHE``, default ``~/.cache/rnd_jax``).
Programs are cached whatever their compile time (JAX's default keeps only those above 1 s, which
on the 8x8 digits are few of them). Library code never calls this: caching is the program's choice.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax

ENV = "RND_JAX_COMPILE_CACHE"
OFF = ("0", "off", "none", "false", "no")


def default_dir() -> Path | None:
    """The cache folder in force: ``$RND_JAX_COMPILE_CACHE``, else ``<rnd_jax cache>/xla``; None if off."""
    env = os.environ.get(ENV)
    if env is not None:
        if env.strip().lower() in OFF or not env.strip():
            return None
        return Path(env).expanduser()
    from rnd_jax.train import default_cache_dir
    return default_cache_dir() / "xla"


def enable(path: str | os.PathLike | None = None, min_compile_s: float = 0.0) -> Path | None:
    """Turn the persistent compilation cache on (at ``path``, default :func:`default_dir`); returns the folder.

    Returns None (and leaves the cache off) when it is turned off by ``$RND_JAX_COMPILE_CACHE`` and no
    ``path`` is given. ``min_compile_s``: programs that compile faster than this are not stored.
    """
    if isinstance(min_compile_s, bool) or not isinstance(min_compile_s, (int, float)) or not min_compile_s >= 0:
        raise ValueError(f"min_compile_s must be a number >= 0, got {min_compile_s!r}")
    folder = Path(path).expanduser() if path is not None else default_dir()
    if folder is None:
        return None
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"compilation cache folder {str(folder)!r} cannot be created: {e}") from None
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_s))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return folder


def disable() -> None:
    """Turn the persistent compilation cache off for the rest of this process."""
    jax.config.update("jax_compilation_cache_dir", None)
