"""Per-phase GPU times of one step, from CUDA events on the current stream.

Code under measurement calls `timer.mark(name)` at the end of each phase (only when a timer is
attached: `SlotExperts.timer`, `AllToAllDispatcher.timer`, None by default). The collectives are
stream-ordered (the compute stream waits for them), so an event recorded after one marks its end.
"""

from __future__ import annotations

import torch


class PhaseTimer:
    def __init__(self):
        self._marks: list[tuple[str, torch.cuda.Event]] = []

    def start(self) -> None:
        self._marks = []
        self.mark("start")

    def mark(self, name: str) -> None:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        self._marks.append((name, event))

    def phases_ms(self) -> dict[str, float]:
        """{phase: ms} between consecutive marks; host sync (waits for the last event)."""
        self._marks[-1][1].synchronize()
        out: dict[str, float] = {}
        for (_, a), (name, b) in zip(self._marks, self._marks[1:]):
            out[name] = out.get(name, 0.0) + a.elapsed_time(b)
        return out
