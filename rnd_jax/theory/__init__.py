"""Closed forms from the randomized-defense papers, checked against Monte-Carlo of their assumptions.

"What does the theory predict for this model at this noise level?" — the functions here answer it
from a few statistics of the model (:mod:`rnd_jax.stats` measures them), and
:mod:`rnd_jax.theory.montecarlo` simulates each theorem's own assumptions so that the tests can hold
every formula to a tolerance derived from the Monte-Carlo standard error.

Modules (one per paper; each docstring cites the equations and lists the errata found):

- :mod:`~rnd_jax.theory.aithal_li` — output noise vs NES / AutoZOOM (Aithal & Li 2022): Theorem 1
  (eq. 4, 17), Lemma 1 (eq. 5), Remark 2 (Fig. 6), Theorem 2 (eq. 6), Theorem 3 (eq. 7),
  Theorem 4 (eq. 8), Lemma 3 (eq. 57), Section IV-A recomputed from Table 1.
- :mod:`~rnd_jax.theory.park` — output randomization (Park et al., Sec. 5): top-1 flip probability
  from the margins, noise level for a target flip rate, finite-difference bias.
- :mod:`~rnd_jax.theory.qin` — random noise defense (Qin et al. 2021, Theorems 1-3): query
  complexity vs ``nu/mu``, EOT limit, sign-flip bound.
- :mod:`~rnd_jax.theory.rfd` — randomized feature defense (Theorem 1 / eq. 26, Sec. 3.4-3.5)
  from ``jax.grad`` at the input and at any ``perturb``-marked layer.

Conventions: every noise level is a standard deviation (``sigma`` on outputs, ``nu`` on inputs or
features, ``beta``/``mu`` the attacker's probe), SNRs are linear power ratios (:func:`db` converts),
and concrete invalid arguments raise ``ValueError``. The closed forms are vectorised and broadcast
their arguments; they compute in float64 numpy/scipy for Python or numpy inputs (nothing to
compile) and in ``jax.numpy`` as soon as one input is a jax array, so they also run under
``jit``/``vmap``/``grad`` (traced arguments are not checked).
"""

from rnd_jax.theory import aithal_li, montecarlo, park, qin, rfd
from rnd_jax.theory._util import Phi, Phi_inv, db, from_db

__all__ = ["Phi", "Phi_inv", "aithal_li", "db", "from_db", "montecarlo", "park", "qin", "rfd"]
