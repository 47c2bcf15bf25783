"""A metric carries its own reduction: how its values from micro-batches, updates and processes combine.

- `Mean(value, weight)`: a weighted mean (token fractions weigh by their valid tokens; a figure that
  is the same on every process, or a loss share, weighs 1).
- `Sum(value)`: values add up (per-token predictions already divided by the global token count).
- `Min(value)` / `Max(value)`: the extreme.

Who makes them: the objective's token terms (objective.token_terms), an update (update.py), the
entropy accounting (accounting.StepAccount.finish), the rewards (rewards.Scored.metrics). `Tally`
combines the micro-batches of an update (and the updates of a step); `reduce` combines one figure per
process into the number the run logs (on one process: its own value, untouched). A contract between
layers (data makes them, training reduces them), so it lives here.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    value: float
    weight: float = 1.0

    def combine(self, values: list[float], weights: list[float]) -> float:
        raise NotImplementedError


class Mean(Metric):
    def combine(self, values, weights):
        return sum(v * w for v, w in zip(values, weights)) / max(sum(weights), 1)


class Sum(Metric):
    def combine(self, values, weights):
        return sum(values)


class Min(Metric):
    def combine(self, values, weights):
        return min(values)


class Max(Metric):
    def combine(self, values, weights):
        return max(values)


class Tally:
    """One update's metrics over its micro-batches: Mean by (sum of value x weight) / total weight,
    Min / Max as such, Sum added up."""

    def __init__(self) -> None:
        self._kind: dict[str, type[Metric]] = {}
        self._total: dict[str, float] = {}
        self._weight: dict[str, float] = {}

    def add(self, metrics: dict[str, Metric]) -> None:
        for key, m in metrics.items():
            kind = self._kind.setdefault(key, type(m))
            if key not in self._total:
                self._total[key], self._weight[key] = (0.0 if kind in (Mean, Sum) else m.value), 0.0
            if kind is Mean:
                self._total[key] += m.value * m.weight
            elif kind is Sum:
                self._total[key] += m.value
            else:
                self._total[key] = m.combine([self._total[key], m.value], [1.0, 1.0])
            self._weight[key] += m.weight

    def result(self) -> dict[str, Metric]:
        out: dict[str, Metric] = {}
        for key, kind in self._kind.items():
            total, weight = self._total[key], self._weight[key]
            out[key] = kind(total / max(weight, 1), weight) if kind is Mean else kind(total, weight)
        return out


def reduce(accelerator, metrics: dict[str, Metric]) -> dict[str, float]:
    """The logged number of each metric over all processes, by its own reduction (a collective: every
    process calls it with the same keys)."""
    if accelerator.num_processes == 1:
        return {k: m.value for k, m in metrics.items()}
    from accelerate.utils import gather_object

    every = gather_object([{k: (m.value, m.weight) for k, m in metrics.items()}])
    return {k: m.combine([e[k][0] for e in every], [e[k][1] for e in every]) for k, m in metrics.items()}
