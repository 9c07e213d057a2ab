"""Metric history for training notices: last and best values and a sparkline per metric.

:class:`MetricHistory` records the values a run logs (``n.log(loss=0.31)``,
or a framework callback once per epoch) and summarizes each metric as a
:class:`MetricSummary`: its last value, its best value and where it was
reached, and a sparkline of its course (``▁▂▃▅▇``). The completion notice
(:class:`~chat_magic.report.Report`) renders the summaries with
:func:`text_lines` and :func:`card_section`, so ``notify_when_done`` and the
Lightning, Keras and Hugging Face callbacks all show metrics one way.

Whether lower or higher is better is guessed from the name, word by word
(``val_loss``, ``eval_accuracy``, ``valMAE``): loss, error, mae, mse,
perplexity and their kin are lower-is-better; accuracy, f1, auc, precision,
recall and their kin higher-is-better. A name that says neither gets no
"best" (its range is shown instead): a wrong guess would mislead more than
no guess.

Nothing here imports a framework: a value is turned into a float through
``.item()`` (torch tensors, numpy scalars) or ``float()``.
"""

from __future__ import annotations

import html
import math
import numbers
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "MetricHistory", "MetricSummary", "as_number", "card_section", "card_widgets", "direction", "format_value",
    "sparkline", "text_lines"
]

BARS = "▁▂▃▄▅▆▇█"
BAD = "×"  # a NaN or an infinity in the course (a bucket holding one): never one of BARS
GAP = BAD  # the old name
SPARK_WIDTH = 24  # characters of a sparkline; longer histories are averaged into buckets
MAX_SHOWN = 20  # metrics in one notice: the rest are counted in one line
MAX_POINTS = 100_000  # values kept per metric (a bound on memory for step-level logging)

MIN, MAX = "min", "max"
_LOWER = frozenset({
    "loss", "error", "err", "mae", "mse", "rmse", "mape", "smape", "msle", "perplexity", "ppl", "nll",
    "crossentropy", "entropy", "wer", "cer", "ter", "bpc", "bpd", "hinge", "kld", "divergence", "fid", "distance",
})
_HIGHER = frozenset({
    "acc", "accuracy", "f1", "fbeta", "auc", "auroc", "roc", "ap", "precision", "recall", "map", "bleu", "rouge",
    "meteor", "iou", "miou", "dice", "r2", "top1", "top5", "topk", "spearman", "pearson", "mcc", "matthews",
    "kappa", "sensitivity", "specificity", "psnr", "ssim", "ndcg", "mrr", "hit", "hits", "exact", "em", "reward",
})


def _words(name: str) -> list[str]:
    """``"val_MeanAbsError@5"`` -> ``["val", "mean", "abs", "error", "5"]``: snake, kebab and camel case."""
    spaced = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", " ", str(name))
    return [w for w in re.split(r"[^A-Za-z0-9]+", spaced.lower()) if w]


def direction(name: str) -> str | None:
    """``"min"`` (lower is better), ``"max"`` (higher is better) or None (the name does not say).

    The last word that decides wins: ``val_acc_loss`` is a loss.
    """
    for word in reversed(_words(name)):
        for w in (word, word.rstrip("0123456789")):  # "f1" as such, "rouge1" as "rouge"
            if w in _LOWER:
                return MIN
            if w in _HIGHER:
                return MAX
    return None


def as_number(value: Any) -> float | None:
    """A metric value as a float: numbers, one-element tensors and arrays, numpy scalars; else None."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, numbers.Real):
        return float(value)
    item = getattr(value, "item", None)
    if callable(item):
        try:
            value = item()  # a torch tensor / numpy scalar: raises unless it holds one value
        except Exception:
            return None
        return float(value) if isinstance(value, numbers.Real) and not isinstance(value, bool) else None
    return None


def format_value(value: float | None) -> str:
    """Four significant digits (``0.3123``, ``1.235e+04``), ``nan`` as such."""
    if value is None:
        return "–"
    if math.isnan(value) or math.isinf(value):
        return str(value)
    if value == int(value) and abs(value) < 1e6:
        return str(int(value))
    return f"{value:.4g}"


def sparkline(values: Iterable[float], width: int = SPARK_WIDTH) -> str:
    """``▁▂▄▇`` for the course of ``values``, at most ``width`` characters.

    A longer series is averaged into ``width`` buckets so the shape stays; a
    flat series is a row of ``▄`` (a spread within float rounding of the
    values, as bucket averages of a constant have, counts as flat); NaN and
    infinities show as ``×``, and so does a bucket holding one.
    """
    points = list(values)
    if not points:
        return ""
    if len(points) > width > 0:
        points = [_mean(points[i * len(points) // width:(i + 1) * len(points) // width]) for i in range(width)]
    finite = [v for v in points if math.isfinite(v)]
    if not finite:
        return BAD * len(points)
    lo, hi = min(finite), max(finite)
    if math.isclose(hi, lo, rel_tol=1e-9, abs_tol=1e-300):
        return "".join(BARS[3] if math.isfinite(v) else BAD for v in points)
    top = len(BARS) - 1
    return "".join(BARS[round((v - lo) / (hi - lo) * top)] if math.isfinite(v) else BAD for v in points)


def _mean(bucket: list[float]) -> float:
    """The bucket's mean; NaN when it holds a NaN or an infinity (so the mark survives averaging)."""
    if not all(math.isfinite(v) for v in bucket):
        return math.nan
    return math.fsum(bucket) / len(bucket)


def point(unit: str, step: int) -> str:
    """A point of a course by its unit: ``epoch 3``, ``step 1,200``, or Lightning's ``epoch=2`` (as in its checkpoint names)."""
    return f"epoch={step}" if unit == "epoch=" else f"{unit} {step:,}"


@dataclass(frozen=True)
class MetricSummary:
    """One metric's course in a notice."""

    name: str
    last: float
    count: int
    goal: str | None  # "min", "max" or None (unknown)
    best: float | None  # by ``goal``; None when unknown or never finite
    best_step: int | None  # the step (epoch) where ``best`` was reached
    low: float | None  # the finite range, for metrics of unknown direction
    high: float | None
    spark: str
    unit: str = "epoch"  # what a step counts: "epoch", "epoch=" (Lightning's 0-based index) or "step"
    first_bad: tuple[int | None, float] | None = None  # (step, value) where it first went NaN or infinite

    def describe(self) -> str:
        """``0.2981 · best 0.2790 (min, epoch 3)``, ``0.001 · range 0.0001–0.001``, ``… · non-finite: nan at step 40``."""
        text = format_value(self.last)
        if self.best is not None:
            where = f", {point(self.unit, self.best_step)}" if self.best_step is not None else ""
            text += f" · best {format_value(self.best)} ({self.goal}{where})"
        elif self.goal is None and self.low is not None and self.count > 1 and self.low != self.high:
            text += f" · range {format_value(self.low)}–{format_value(self.high)}"
        if self.first_bad is not None:
            text += f" · non-finite: {self.bad_text()}"
        return text

    def bad_text(self) -> str:
        """``inf at epoch 3``: the first NaN or infinity (empty when the course stayed finite)."""
        if self.first_bad is None:
            return ""
        step, value = self.first_bad
        return format_value(value) + (f" at {point(self.unit, step)}" if step is not None else "")


class MetricHistory:
    """The values logged during one run, per metric, in order.

    ``record({"loss": 0.3}, step=2)`` adds a point; a value that is not a
    number is refused (its name is returned, so the caller can say so once).
    ``goals`` overrides the guessed direction: ``{"score": "min"}``.
    """

    def __init__(self, goals: Mapping[str, str] | None = None, unit: str = "epoch") -> None:
        self.goals = dict(goals or {})
        self.unit = unit  # what ``step`` counts, for "best … (min, epoch 3)": "epoch" or "step"
        self._points: dict[str, list[tuple[int | None, float]]] = {}

    def __bool__(self) -> bool:
        return bool(self._points)

    @property
    def names(self) -> list[str]:
        return list(self._points)

    def record(self, values: Mapping[str, Any], step: int | None = None) -> list[str]:
        """Add one point per numeric value; return the names whose value was not a number."""
        refused = []
        for name, raw in values.items():
            value = as_number(raw)
            if value is None:
                refused.append(str(name))
                continue
            points = self._points.setdefault(str(name), [])
            points.append((step, value))
            if len(points) > MAX_POINTS:
                del points[: len(points) - MAX_POINTS]
        return refused

    def values(self, name: str) -> list[float]:
        return [v for _, v in self._points.get(name, [])]

    def last(self, name: str) -> float | None:
        points = self._points.get(name)
        return points[-1][1] if points else None

    def summary(self, name: str) -> MetricSummary:
        points = self._points[name]
        goal = self.goals.get(name) or direction(name)
        finite = [(s, v) for s, v in points if math.isfinite(v)]
        best = best_step = None
        if goal in (MIN, MAX) and finite:
            pick = min if goal == MIN else max
            best_step, best = pick(finite, key=lambda sv: sv[1])  # the first step reaching it
        values = [v for _, v in points]
        fvals = [v for _, v in finite]
        bad = next(((s, v) for s, v in points if not math.isfinite(v)), None)
        return MetricSummary(
            name=name, last=values[-1], count=len(values), goal=goal, best=best, best_step=best_step,
            low=min(fvals) if fvals else None, high=max(fvals) if fvals else None, spark=sparkline(values),
            unit=self.unit, first_bad=bad,
        )

    def first_bad(self) -> tuple[str, int | None, float] | None:
        """``(name, step, value)`` of the metric that went NaN or infinite first (by step, then logging order)."""
        found = []
        for order, (name, points) in enumerate(self._points.items()):
            for s, v in points:
                if not math.isfinite(v):
                    found.append(((s if s is not None else math.inf), order, name, s, v))
                    break
        if not found:
            return None
        _, _, name, s, v = min(found, key=lambda f: (f[0], f[1]))
        return name, s, v

    def summaries(self) -> list[MetricSummary]:
        return [self.summary(n) for n in self._points]


# -- renderings (used by report.Report) -------------------------------------------------


def _more(summaries: list[MetricSummary], limit: int) -> str:
    return f"[… {len(summaries) - limit:,} more metrics]" if len(summaries) > limit else ""


def text_lines(summaries: list[MetricSummary], limit: int = MAX_SHOWN) -> list[str]:
    """Chat-syntax lines: ``val_loss` 0.298 · best 0.279 (min, epoch 3) ▇▅▃▂▁``.

    Metric names come from user code: they sit in inline code with backticks
    replaced, so they cannot format, mention or link.
    """
    lines = [f"`{_clip(s.name).replace('`', 'ʼ').replace('<', '‹')}` {s.describe()}  {s.spark}".rstrip() for s in summaries[:limit]]
    more = _more(summaries, limit)
    return lines + ([more] if more else [])


def card_section(summaries: list[MetricSummary], limit: int = MAX_SHOWN) -> dict[str, Any] | None:
    """A ``Metrics`` card section: one row per metric (name, last/best, sparkline), HTML-escaped."""
    if not summaries:
        return None
    widgets: list[dict[str, Any]] = [
        {"decoratedText": {"topLabel": html.escape(_clip(s.name)), "text": html.escape(s.describe()),
                           "bottomLabel": s.spark or " ", "wrapText": True}}
        for s in summaries[:limit]
    ]
    more = _more(summaries, limit)
    if more:
        widgets.append({"textParagraph": {"text": html.escape(more)}})
    return {"header": "Metrics", "widgets": widgets}


def card_widgets(summaries: list[MetricSummary], limit: int = MAX_SHOWN) -> int:
    """How many widgets :func:`card_section` uses (the card's 100-widget budget is shared)."""
    return 0 if not summaries else min(len(summaries), limit) + (1 if len(summaries) > limit else 0)


def _clip(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
