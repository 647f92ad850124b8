"""A Telemetry's metrics overrides applied to one observation: dropped, or its tags changed.

The rules come from the ``istio.stats`` filter (:mod:`waypoint.config.stats`);
:class:`waypoint.telemetry.Telemetry` asks :meth:`Overrides.apply` for each
standard metric's label values. A removed tag is exposed with an empty value
(prometheus-client fixes a family's label names; PromQL treats an empty label
as absent), an upserted one with its expression's value (``unknown`` when it
has none, as a CEL error is in Istio). New label sets are bounded as the
standard ones are: past ``cap`` per metric they fold into the overflow series.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from waypoint.config.stats import Expression, StatsConfig

UNKNOWN = "unknown"
Headers = Sequence[tuple[str, str]]


class Context:
    """What an expression may read of one request (or connection)."""

    __slots__ = ("attributes", "headers")

    def __init__(self, attributes: Mapping[str, str], headers: Headers = ()) -> None:
        self.attributes = attributes
        self.headers = headers

    def value(self, e: Expression) -> str:
        if e.literal is not None:
            return e.literal
        if e.header is not None:
            return next((v for k, v in self.headers if k == e.header), UNKNOWN)
        return self.attributes.get(e.attribute or "", "") or UNKNOWN


class Overrides:
    def __init__(self, cap: Callable[[], int]) -> None:
        self.cap = cap
        self._seen: dict[str, set[tuple[str, ...]]] = {}

    def apply(
        self,
        stats: StatsConfig,
        metric: str,
        names: Sequence[str],
        labels: tuple[str, ...],
        context: Callable[[], Context],
        overflow: Callable[[], tuple[str, ...]],
    ) -> tuple[str, ...] | None:
        """The label values to observe ``metric`` with, or None: the metric is dropped."""
        rule = stats.rule(metric)
        if rule is None:
            return labels
        if rule.drop:
            return None
        if not rule.tags:
            return labels
        values = list(labels)
        ctx: Context | None = None
        for i, name in enumerate(names):
            if name in rule.tags:
                e = rule.tags[name]
                if e is None:
                    values[i] = ""
                else:
                    ctx = ctx or context()
                    values[i] = ctx.value(e)
        out = tuple(values)
        seen = self._seen.setdefault(metric, set())
        if out not in seen:
            if len(seen) >= self.cap():
                return overflow()
            seen.add(out)
        return out
