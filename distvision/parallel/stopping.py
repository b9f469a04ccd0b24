"""When a run stops. Every rank takes the same decision from the same globally reduced numbers.

Epoch-end criteria (target accuracy, patience) read the epoch records, whose accuracies are exact
global counts, identical on every rank. Mid-epoch criteria (time, divergence, a stop signal) travel
as votes in the small all-reduce of losses and votes, so all ranks see them at the same step.
"""

from __future__ import annotations

from dataclasses import dataclass

from distvision.config import StoppingSettings, TrainConfig

_FLAG_DEFAULTS = StoppingSettings()  # the flags' defaults: TrainConfig is their one source


@dataclass(frozen=True)
class StopRules:
    """The stopping flags of a run, with the epoch budget (TrainConfig's StoppingSettings checks them)."""

    max_epochs: int
    target_accuracy: float | None = _FLAG_DEFAULTS.target_accuracy
    patience: int | None = _FLAG_DEFAULTS.patience
    min_delta: float = _FLAG_DEFAULTS.min_delta
    monitor: str = _FLAG_DEFAULTS.monitor  # "test" or "val": which accuracy the epoch criteria watch
    max_time: float | None = _FLAG_DEFAULTS.max_time  # seconds of training

    @classmethod
    def from_config(cls, config: TrainConfig, max_epochs: int) -> StopRules:
        """The rules the stopping flags give; max_epochs is the recipe's epochs after the flags."""
        return cls(max_epochs, config.target_accuracy, config.patience, config.min_delta, config.monitor,
                   config.max_time)

    @property
    def key(self) -> str:
        return f"{self.monitor}_accuracy"


def stop_after_epoch(rules: StopRules, history: list[dict]) -> str | None:
    """The reason to stop after the last epoch record in history, or None to go on."""
    if not history:
        return None
    watched = [record[rules.key] for record in history]
    if rules.target_accuracy is not None and watched[-1] >= rules.target_accuracy:
        return "target_accuracy"
    if rules.patience is not None and len(watched) > rules.patience:
        best_before = max(watched[: -rules.patience])
        if max(watched[-rules.patience :]) <= best_before + rules.min_delta:
            return "patience"
    if len(history) >= rules.max_epochs:
        return "max_epochs"
    return None


def time_is_up(rules: StopRules, train_seconds: float) -> bool:
    return rules.max_time is not None and train_seconds >= rules.max_time
