"""The k-repeat prompt sampler of Flow-GRPO: every batch holds `prompts_per_batch` prompts, each
`group_size` times, shuffled so that a group's members spread over the devices.

A batch is a pure function of (seed, step), so resuming at a step reproduces the data exactly
without saving any iterator state.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class KRepeatSampler:
    num_prompts: int
    prompts_per_batch: int
    group_size: int
    seed: int = 0

    def __post_init__(self):
        if self.group_size < 2:
            raise ValueError(f"group_size must be >= 2 (advantages compare images of one prompt), got {self.group_size}")
        if not 1 <= self.prompts_per_batch <= self.num_prompts:
            raise ValueError(
                f"prompts_per_batch={self.prompts_per_batch} must be between 1 and the {self.num_prompts} prompts available"
            )

    @property
    def batch_size(self) -> int:
        return self.prompts_per_batch * self.group_size

    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(prompt indices [B], group ids [B] in 0..prompts_per_batch-1) of the batch at `step`."""
        rng = np.random.default_rng([self.seed, step])
        prompts = rng.choice(self.num_prompts, self.prompts_per_batch, replace=False)
        groups = np.repeat(np.arange(self.prompts_per_batch), self.group_size)
        order = rng.permutation(self.batch_size)
        return prompts[groups[order]], groups[order]
