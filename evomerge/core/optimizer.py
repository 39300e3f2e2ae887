"""CMA-ES as an ask/tell object that the flow drives (no ``fmin`` callback hides the loop).

pycma is imported here: it is pure numpy, which the core allows. Seeding: pycma draws its samples
through the ``randn`` option, which we bind to a private ``numpy.random.Generator``; ``seed=nan``
stops pycma from reseeding numpy's global generator. Two optimizers built with the same seed and
told the same scores ask the same vectors, bit for bit, whatever else in the process uses
``numpy.random`` (lm-eval reseeds it on every evaluation).

>>> opt = CmaOptimizer(x0=[0.5, 0.5], sigma0=0.2, seed=1, popsize=4)
>>> X = opt.ask()
>>> X.shape
(4, 2)
>>> opt.tell(X, [-(x ** 2).sum() for x in X])   # scores: higher is better
>>> opt.generation
1
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np

with warnings.catch_warnings():
    # pycma warns at import when matplotlib is missing; evomerge plots nothing with it.
    warnings.simplefilter("ignore")
    import cma


class CmaOptimizer:
    """Maximizes a score with CMA-ES. ``tell`` takes scores (higher is better)."""

    def __init__(
        self,
        x0: Sequence[float],
        sigma0: float,
        seed: int,
        popsize: int | None = None,
    ):
        x0 = np.asarray(x0, dtype=float)
        self._rng = np.random.default_rng(seed)
        # pycma refuses 1-D problems; a single free value (slerp, one layer group) gets a second,
        # inert coordinate that decoding never reads.
        self._padded = x0.size == 1
        start = np.append(x0, 0.0) if self._padded else x0
        options = {
            "seed": np.nan,  # never touch numpy's global generator
            "randn": lambda *shape: self._rng.standard_normal(shape),
            "verbose": -9,
            "verb_disp": 0,
            "verb_log": 0,
            "signals_filename": "",  # pycma would otherwise read options from a file in the cwd
            "tolflatfitness": 10**9,  # scores plateau on small eval sets; the budget decides
        }
        if popsize is not None:
            options["popsize"] = popsize
        self._es = cma.CMAEvolutionStrategy(start, sigma0, options)
        self.dimension = x0.size
        self.generation = 0
        self._asked: np.ndarray | None = None

    @property
    def popsize(self) -> int:
        return int(self._es.popsize)

    def ask(self) -> np.ndarray:
        """The next generation's candidates, shape (popsize, dimension)."""
        if self._asked is not None:
            raise RuntimeError("ask() called twice without tell(); tell the last generation first")
        asked = np.array(self._es.ask(), dtype=float)
        self._asked = asked
        return asked[:, : self.dimension] if self._padded else asked.copy()

    def tell(self, candidates: np.ndarray, scores: Sequence[float]) -> None:
        """Report one score per asked candidate, in the order asked."""
        if self._asked is None:
            raise RuntimeError("tell() without ask()")
        candidates = np.asarray(candidates, dtype=float)
        asked = self._asked[:, : self.dimension] if self._padded else self._asked
        if candidates.shape != asked.shape or not np.array_equal(candidates, asked):
            raise ValueError("tell() must receive exactly the candidates of the last ask()")
        scores = np.asarray(scores, dtype=float)
        if scores.shape != (len(candidates),) or not np.all(np.isfinite(scores)):
            raise ValueError("tell() needs one finite score per candidate")
        self._es.tell(list(self._asked), list(-scores))  # pycma minimizes
        self._asked = None
        self.generation += 1

    @property
    def mean(self) -> np.ndarray:
        m = np.asarray(self._es.mean, dtype=float)
        return m[: self.dimension]

    @property
    def sigma(self) -> float:
        return float(self._es.sigma)
