"""Token streams for the demo, benchmarks and tests: skewed, and drifting between phases.

Expert load follows the tokens: with a fixed random router, a token id always routes to the same
experts, so a stream dominated by a few ids makes a few experts hot, and changing those ids
moves the hot experts (drift).
"""

from __future__ import annotations

import numpy as np


def zipf_tokens(vocab: int, tokens: int, zipf: float, rng: np.random.Generator) -> np.ndarray:
    """Token ids drawn from a Zipf law over a fixed random permutation of the vocabulary."""
    perm = np.random.default_rng(1234).permutation(vocab)
    return perm[(rng.zipf(zipf, size=tokens) - 1) % vocab]


class DriftingStream:
    """Batches where `hot_fraction` of the tokens are drawn from `hot_tokens` ids; the hot ids
    change every `phase_steps` batches (a drift); the rest are uniform over the vocabulary."""

    def __init__(self, vocab: int, tokens_per_step: int, phase_steps: int, hot_tokens: int = 1,
                 hot_fraction: float = 0.85, seed: int = 0):
        if not 0.0 <= hot_fraction <= 1.0:
            raise ValueError(f"hot_fraction={hot_fraction} must be in [0, 1]")
        self.vocab, self.tokens_per_step, self.phase_steps = vocab, tokens_per_step, phase_steps
        self.hot_tokens, self.hot_fraction = hot_tokens, hot_fraction
        self.rng = np.random.default_rng(seed)
        self.step = 0
        self._hot = None

    def phase(self) -> int:
        return self.step // self.phase_steps

    def next_batch(self) -> np.ndarray:
        if self.step % self.phase_steps == 0:
            self._hot = self.rng.choice(self.vocab, size=self.hot_tokens, replace=False)
        self.step += 1
        hot = self.rng.random(self.tokens_per_step) < self.hot_fraction
        return np.where(hot, self.rng.choice(self._hot, self.tokens_per_step),
                        self.rng.integers(0, self.vocab, self.tokens_per_step))
