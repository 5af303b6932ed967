"""The routing-statistics snapshot a worker ships to the coordinator: versioned msgpack.

Schema 1 (a msgpack map):
    schema    int   1
    worker    int   rank in the epoch
    epoch     int
    step_lo   int   first step counted (inclusive)
    step_hi   int   last step counted (exclusive)
    version   int   placement version those steps ran with
    shape     [L, E]
    counts    bytes little-endian int32 [L, E], routed (token, k) pairs per logical expert
    rows      bytes little-endian int32 [L, S_w], rows this worker's slots actually computed
    commit_ms float | nil  time the worker spent switching placement in this range, if it did
    tier      map | nil    a worker with a host tier: its counts over the range (tier_counts.tier_totals'
                           keys: rows and experts per cold path, host seconds, copied bytes,
                           prefetch use, proposed and overruled splits);
                           optional, so readers of snapshots without it are unaffected

int32 keeps a 58 x 256 snapshot at 59 KiB; counts over a snapshot interval fit easily.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgpack
import numpy as np

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class LoadSnapshot:
    worker: int
    epoch: int
    step_lo: int
    step_hi: int
    version: int
    counts_LE: np.ndarray
    rows_LS: np.ndarray
    commit_ms: float | None = None
    tier: dict | None = None  # host-tier counts over the range (tier_counts.tier_totals' keys); None: no tier

    def encode(self) -> bytes:
        negative = sorted(name for name, value in (self.tier or {}).items() if value < 0)
        if negative:
            raise ValueError(f"snapshot tier counts must be >= 0, got {', '.join(f'{n}={self.tier[n]}' for n in negative)}")
        return msgpack.packb({
            "schema": SCHEMA_VERSION, "worker": self.worker, "epoch": self.epoch,
            "step_lo": self.step_lo, "step_hi": self.step_hi, "version": self.version,
            "shape": list(self.counts_LE.shape), "counts": _int32_bytes(self.counts_LE, "counts"),
            "rows_shape": list(self.rows_LS.shape), "rows": _int32_bytes(self.rows_LS, "rows"),
            "commit_ms": self.commit_ms, "tier": self.tier,
        })

    @classmethod
    def decode(cls, payload: bytes) -> LoadSnapshot:
        msg = msgpack.unpackb(payload)
        if msg.get("schema") != SCHEMA_VERSION:
            raise ValueError(f"unsupported snapshot schema {msg.get('schema')!r} (this build reads {SCHEMA_VERSION})")
        counts = np.frombuffer(msg["counts"], dtype="<i4").reshape(msg["shape"]).astype(np.int64)
        rows = np.frombuffer(msg["rows"], dtype="<i4").reshape(msg["rows_shape"]).astype(np.int64)
        return cls(msg["worker"], msg["epoch"], msg["step_lo"], msg["step_hi"], msg["version"], counts, rows,
                   msg.get("commit_ms"), msg.get("tier"))


def _int32_bytes(values: np.ndarray, what: str) -> bytes:
    if values.size and (values.max() > np.iinfo(np.int32).max or values.min() < 0):
        raise ValueError(f"snapshot {what} out of int32 range (max {int(values.max())}); ship more often")
    return np.ascontiguousarray(values, dtype="<i4").tobytes()
