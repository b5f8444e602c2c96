"""The metric registry: every metric evaluation knows, in one place.

`eval.metrics`, `--metrics`, config validation, the scores a run returns, what the registry
description shows and what a sweep may optimise all read this table, so a new metric is one
row here plus its computation in `score.py`. Importing it costs nothing (no torch).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MetricSpec:
    """One selectable metric: the name in `eval.metrics`, the score keys it produces, whether it
    compares against the real set, which way is better for its first key, and its source."""

    name: str
    keys: tuple[str, ...]
    needs_real: bool
    lower_is_better: bool
    paper: str


# k of the nearest-neighbour balls, as in the papers: precision/recall (Kynkaanniemi et al.
# 2019, k=3), density/coverage (Naeem et al. 2020, k=5).
PRC_K = 3
DC_K = 5

METRICS: dict[str, MetricSpec] = {m.name: m for m in (
    MetricSpec("fid", ("fid",), True, True, "Heusel et al. 2017"),
    MetricSpec("kid", ("kid", "kid_std"), True, True, "Binkowski et al. 2018"),
    MetricSpec("is", ("is", "is_std"), False, False, "Salimans et al. 2016"),
    MetricSpec("prc", ("precision", "recall"), True, False,
               f"Kynkaanniemi et al. 2019, k={PRC_K}"),
    MetricSpec("dc", ("density", "coverage"), True, False, f"Naeem et al. 2020, k={DC_K}"),
    MetricSpec("ifid", ("ifid",), True, True,
               "intra-class FID (StudioGAN): mean over classes of FID against that class"),
)}

# In-training default: FID + KID cost one Inception pass over the generated images and a few
# seconds of scoring; prc/dc add ~1 s (1,000 x 1,000 distances), ifid K small FIDs.
DEFAULT_METRICS = ("fid", "kid")

# per-class intra-class FID scores are returned as `ifid/<class>` next to the mean `ifid`
IFID_CLASS_PREFIX = "ifid/"


def choices() -> str:
    """'fid, kid, is, prc, dc, ifid': for help texts and error messages."""
    return ", ".join(METRICS)


def check_metrics(metrics: list[str] | tuple[str, ...], where: str = "eval.metrics") -> list[str]:
    """The metric names deduplicated in order; ValueError naming `where` on an unknown one."""
    bad = [m for m in metrics if m not in METRICS]
    if bad:
        raise ValueError(f"{where}: unknown {bad}; choose from {choices()}")
    return list(dict.fromkeys(metrics))


def score_keys(metrics: list[str] | tuple[str, ...] | None = None) -> list[str]:
    """The keys a scores dict holds for `metrics` (default: all), in registry order."""
    names = METRICS if metrics is None else metrics
    return [k for m in METRICS.values() if m.name in names for k in m.keys]


def headline_keys() -> list[str]:
    """The score keys without their `_std` companions: what descriptions and tags show."""
    return [k for k in score_keys() if not k.endswith("_std")]


def lower_is_better(key: str) -> bool:
    """Which way a score key improves (a sweep's mode)."""
    for m in METRICS.values():
        if key in m.keys:
            return m.lower_is_better
    raise KeyError(key)
