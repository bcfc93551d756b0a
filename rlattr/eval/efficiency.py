"""Sample-efficiency metrics of the IIF paper (Hu et al. 2025): SE_ave, SE_peak, RT_peak.

A learning curve is ``Tensor``-free: a ``numpy`` array ``curve[r]`` holding the performance of the
policy after ``r + 1`` rounds (so ``m(v)``, the rounds needed to first reach level ``v``, is the
first ``r + 1`` with ``curve[r] >= v``). Cumulative wall-clock ``seconds[r]`` is the training time
(rollout + scoring + update, evaluation excluded) spent up to and including round ``r + 1``.

* ``SE_ave = mean_v (1 - m_method(v) / m_base(v))`` over ``n_levels`` evenly spaced levels
  ``v_l = v_0 + (peak - v_0) * l / n_levels``, ``l = 1..n_levels``, with ``v_0 = base[0]`` and
  ``peak = max(base)``: every level is reached by the baseline, by construction.
* ``SE_peak`` is the same ratio at the baseline's peak alone; ``RT_peak`` its wall-clock version.
* A level the method never reaches is *censored*: ``m_method(v)`` is set to the method's budget
  (``len(curve)`` rounds, or its total seconds). That is a lower bound on the true value, so a
  censored level flatters the method; :func:`efficiency` reports how many levels were reached.

Everything here is a pure function of arrays; :func:`bootstrap_efficiency` resamples seeds with its
own seeded generator.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from rlattr.errors import RlattrError

Metrics = dict[str, float]


def _curve(name: str, values: np.ndarray) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0 or not np.isfinite(arr).all():
        raise RlattrError(f"{name}: expected a non-empty finite 1-d array, got shape {arr.shape}")
    return arr


def rounds_to_reach(curve: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """Rounds needed to first reach each level: ``float[n_levels]``, ``inf`` where never reached.

    Args:
        curve: ``float[n_rounds]``, performance after round ``r + 1``.
        levels: ``float[n_levels]``.
    """
    c = _curve("curve", curve)
    best = np.maximum.accumulate(c)
    lv = np.atleast_1d(np.asarray(levels, dtype=np.float64))
    idx = np.searchsorted(best, lv, side="left")
    return np.where(idx < c.size, idx + 1.0, np.inf)


def seconds_to_reach(curve: np.ndarray, seconds: np.ndarray, level: float) -> float:
    """Cumulative training seconds at the round that first reaches ``level`` (``inf`` if never)."""
    c = _curve("curve", curve)
    s = _curve("seconds", seconds)
    if s.shape != c.shape:
        raise RlattrError(f"seconds: expected shape {c.shape} like curve, got {s.shape}")
    m = rounds_to_reach(c, np.array([level]))[0]
    return float(s[int(m) - 1]) if np.isfinite(m) else float("inf")


def levels_between(base: np.ndarray, n_levels: int) -> np.ndarray:
    """``float[n_levels]``: evenly spaced levels above ``base[0]`` up to ``max(base)`` (included)."""
    if not isinstance(n_levels, int) or n_levels < 1:
        raise RlattrError(f"n_levels: must be an int >= 1, got {n_levels!r}")
    b = _curve("base", base)
    start, peak = b[0], b.max()
    levels = start + (peak - start) * np.arange(1, n_levels + 1) / n_levels
    # Rounding can put start + (peak - start) * 1 a hair above the peak, which the baseline would then
    # never reach; the levels are the peak and the fractions below it, exactly.
    levels[-1] = peak
    return np.minimum(levels, peak)


def trailing_mean(curve: np.ndarray, window: int) -> np.ndarray:
    """``float[n_rounds]``: ``out[r] = mean(curve[max(0, r - window + 1) : r + 1])`` (no look-ahead).

    Smooths a curve evaluated on few episodes, so that a first passage is not a single noisy spike;
    it delays every curve alike (by about ``(window - 1) / 2`` rounds on a steady rise).
    """
    if not isinstance(window, int) or window < 1:
        raise RlattrError(f"window: must be an int >= 1, got {window!r}")
    c = _curve("curve", curve)
    # each window summed on its own (not as differences of one running sum, whose rounding made
    # window 1 differ from the curve by ~1e-15 and could move a first passage at an exact level)
    return np.array([c[max(0, r - window + 1) : r + 1].mean() for r in range(c.size)])


@dataclass
class Efficiency:
    """SE_ave, SE_peak and RT_peak of a method against a baseline (fractions; 0.34 means 34 %).

    ``levels_reached`` is the fraction of levels the method reached within its budget; ``rt_peak``
    is ``nan`` when no timings were given.
    """

    se_ave: float
    se_peak: float
    rt_peak: float
    levels_reached: float
    peak: float

    def as_dict(self) -> Metrics:
        return asdict(self)


def level_rounds(
    method: np.ndarray, base: np.ndarray, n_levels: int = 20
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """SE_ave's level by level inputs: ``(m_base, m_method, reached)``, each ``[n_levels]`` over
    :func:`levels_between` ``(base, n_levels)``; a level the method never reaches is censored at its
    budget (``len(method)`` rounds) and marked ``False`` in ``reached``. SE_ave's terms are
    ``1 - m_method / m_base``."""
    m_curve, b_curve = _curve("method", method), _curve("base", base)
    levels = levels_between(b_curve, n_levels)
    m_base = rounds_to_reach(b_curve, levels)
    m_method = rounds_to_reach(m_curve, levels)
    reached = np.isfinite(m_method)
    return m_base, np.where(reached, m_method, float(m_curve.size)), reached


def efficiency(
    method: np.ndarray,
    base: np.ndarray,
    *,
    n_levels: int = 20,
    method_seconds: np.ndarray | None = None,
    base_seconds: np.ndarray | None = None,
) -> Efficiency:
    """SE_ave, SE_peak, RT_peak of ``method`` against ``base`` (see the module docstring).

    Args:
        method, base: ``float[n_rounds]`` learning curves (lengths may differ).
        n_levels: number of performance levels for SE_ave.
        method_seconds, base_seconds: ``float[n_rounds]`` cumulative training seconds (optional).
    """
    m_curve, b_curve = _curve("method", method), _curve("base", base)
    levels = levels_between(b_curve, n_levels)
    if b_curve.max() <= b_curve[0]:
        nan = float("nan")
        return Efficiency(nan, nan, nan, nan, float(b_curve.max()))
    m_base, m_method, reached = level_rounds(m_curve, b_curve, n_levels)
    ratios = 1.0 - m_method / m_base
    rt = float("nan")
    if method_seconds is not None and base_seconds is not None:
        peak = float(levels[-1])
        t_base = seconds_to_reach(b_curve, base_seconds, peak)
        t_method = seconds_to_reach(m_curve, method_seconds, peak)
        if not np.isfinite(t_method):
            t_method = float(_curve("method_seconds", method_seconds)[-1])
        rt = 1.0 - t_method / t_base
    return Efficiency(
        se_ave=float(ratios.mean()),
        se_peak=float(ratios[-1]),
        rt_peak=rt,
        levels_reached=float(reached.mean()),
        peak=float(levels[-1]),
    )


def bootstrap_efficiency(
    method: np.ndarray,
    base: np.ndarray,
    *,
    method_seconds: np.ndarray | None = None,
    base_seconds: np.ndarray | None = None,
    n_levels: int = 20,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    paired: bool = False,
    smooth: int = 1,
) -> dict[str, Metrics]:
    """Efficiency of the seed-mean curves with a bootstrap over seeds.

    Args:
        method: ``float[n_seeds_m, n_rounds_m]`` curves of the method, one row per seed.
        base: ``float[n_seeds_b, n_rounds_b]`` curves of the baseline.
        method_seconds, base_seconds: cumulative seconds, same shapes as the curves (optional);
            the seed-mean of the cumulative seconds is used.
        n_boot: bootstrap resamples (seeds drawn with replacement, independently per method).
        smooth: apply :func:`trailing_mean` with this window to the seed-mean curves (1: none).
        paired: draw the same seed rows for both (row i of method and base share a seed and ran
            side by side, so their wall-clock shares the machine's load); needs equal seed counts.
        alpha: the interval is the ``(alpha/2, 1 - alpha/2)`` percentile interval.

    Returns:
        ``{metric: {"value", "std", "lo", "hi"}}`` for ``se_ave``, ``se_peak``, ``rt_peak``,
        ``levels_reached``; ``value`` uses all seeds, ``std`` is the bootstrap standard deviation.
    """
    m, b = np.atleast_2d(np.asarray(method, float)), np.atleast_2d(np.asarray(base, float))
    if n_boot < 1 or not 0 < alpha < 1:
        raise RlattrError(f"n_boot/alpha: need n_boot >= 1 and 0 < alpha < 1, got {n_boot}, {alpha}")
    timed = method_seconds is not None and base_seconds is not None
    ms = np.atleast_2d(np.asarray(method_seconds, float)) if timed else None
    bs = np.atleast_2d(np.asarray(base_seconds, float)) if timed else None

    def stat(im: np.ndarray, ib: np.ndarray) -> Efficiency:
        return efficiency(
            trailing_mean(m[im].mean(0), smooth),
            trailing_mean(b[ib].mean(0), smooth),
            n_levels=n_levels,
            method_seconds=None if ms is None else ms[im].mean(0),
            base_seconds=None if bs is None else bs[ib].mean(0),
        )

    point = stat(np.arange(len(m)), np.arange(len(b))).as_dict()
    rng = np.random.default_rng(seed)
    if paired and len(m) != len(b):
        raise RlattrError(f"paired: needs as many method seeds as base seeds, got {len(m)} and {len(b)}")
    draws = []
    for _ in range(n_boot):
        im = rng.integers(0, len(m), len(m))
        draws.append(stat(im, im if paired else rng.integers(0, len(b), len(b))).as_dict())
    out: dict[str, Metrics] = {}
    for key in ("se_ave", "se_peak", "rt_peak", "levels_reached"):
        vals = np.array([d[key] for d in draws], dtype=float)
        vals = vals[np.isfinite(vals)]
        lo, hi = np.quantile(vals, [alpha / 2, 1 - alpha / 2]) if vals.size else (np.nan, np.nan)
        std = float(vals.std(ddof=1)) if vals.size > 1 else float("nan")
        out[key] = {"value": point[key], "std": std, "lo": float(lo), "hi": float(hi)}
    return out


def mean_and_band(
    curves: np.ndarray, *, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0
) -> np.ndarray:
    """Seed-mean curve and a bootstrap band: ``float[3, n_rounds]`` rows (mean, lo, hi).

    Args:
        curves: ``float[n_seeds, n_rounds]``.
    """
    c = np.atleast_2d(np.asarray(curves, float))
    rng = np.random.default_rng(seed)
    means = c[rng.integers(0, len(c), (n_boot, len(c)))].mean(1)
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2], axis=0)
    return np.stack([c.mean(0), lo, hi])


__all__ = [
    "Efficiency",
    "bootstrap_efficiency",
    "efficiency",
    "level_rounds",
    "levels_between",
    "mean_and_band",
    "rounds_to_reach",
    "seconds_to_reach",
    "trailing_mean",
]
