"""KL coefficient controllers (the beta in r_t = -beta * KL_t).

Adaptive: Ziegler et al., "Fine-Tuning Language Models from Human Preferences" (2019), sec. 2.2:
    e_t = clip(KL_t / KL_target - 1, -0.2, 0.2),   beta_{t+1} = beta_t (1 + K_beta e_t),
with K_beta = n_steps / horizon (n_steps = episodes in the rollout just collected).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class FixedKLController:
    value: float

    def update(self, current_kl: float, n_steps: int) -> None:
        """Fixed: beta never changes."""

    def state_dict(self) -> dict[str, float]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = state["value"]


@dataclass
class AdaptiveKLController:
    value: float
    target: float
    horizon: float

    def update(self, current_kl: float, n_steps: int) -> None:
        """current_kl: the batch's mean per-sequence KL; n_steps: episodes since the last update."""
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = state["value"]
