"""What a Serve replica leaves behind for the replica that replaces it: its committed placement
(phy2log, version, replica split weights, shard widths) and its rebalance log.

    record = load_record(app_name, rank)             # None: nothing saved for this replica rank
    placement, why = resume_placement(record, engine_config, checkpoint)   # None + why: start contiguous
    saver = StateSaver(app_name, rank, replica_tag, checkpoint, carried_log)
    saver.note(engine)                               # engine-loop thread: an int compare; a save when it moved
    clear_app(app_name)                              # a fresh deployment starts fresh

Where: Ray's internal key-value store (the GCS), namespace "moeray", one key per (app, replica
rank): `serve-state/<app>/rank<r>`. Not a detached actor: the GCS is where Serve's own controller
keeps the checkpoint it recovers from, it needs no process of its own (no memory, no CPU, nothing
to schedule or to leak when the app is deleted) and it lives as long as the cluster's head (with
GCS fault tolerance, across head restarts too), while a detached actor's memory dies with its
node. The price: `ray.experimental.internal_kv` is Ray's semi-private API (Serve uses it); it is
wrapped here, so moving to an actor would touch this file only.

Keyed by replica rank, not shared: each replica's engine plans from its own traffic and numbers
its placement versions on its own, so one shared record would mix two version sequences and two
logs. Serve hands a replacement replica the smallest free rank, which is the dead replica's
(Ray 2.60 `DeploymentRankManager`), so a replacement finds its predecessor's record; a rank that
has no record (a replica added by scaling up) starts from the contiguous placement.

Writes run on the saver's own thread (a coordinator call for the log, then one KV put, skipped
when nothing changed), never on the engine loop or the event loop.
"""

from __future__ import annotations

import json
import logging
import threading
import time

import numpy as np

from placement import Placement

log = logging.getLogger(__name__)

NAMESPACE = "moeray"
SCHEMA = 1
LOG_LIMIT = 200  # rebalance log entries kept (oldest dropped first)
_COORDINATOR_TIMEOUT_S = 10.0


def state_key(app_name: str, rank) -> str:
    return f"serve-state/{app_name}/rank{rank}"


def _kv():
    from ray.experimental import internal_kv

    if not internal_kv._internal_kv_initialized():
        raise RuntimeError("Ray's internal KV is not reachable from this process (ray.init first)")
    return internal_kv


def load_record(app_name: str, rank) -> dict | None:
    """The saved record of this (app, replica rank), or None. A record that cannot be read is None
    (and logged): the replica then starts as a fresh one."""
    try:
        raw = _kv()._internal_kv_get(state_key(app_name, rank), namespace=NAMESPACE)
    except Exception as exc:  # noqa: BLE001 - a replica must start even if the state is unreachable
        log.warning("moeray: cannot read the saved state of %s rank %s: %s", app_name, rank, exc)
        return None
    if raw is None:
        return None
    try:
        record = json.loads(raw)
    except ValueError as exc:
        log.warning("moeray: the saved state of %s rank %s is not JSON (%s): ignored", app_name, rank, exc)
        return None
    if not isinstance(record, dict) or record.get("schema") != SCHEMA:
        log.warning("moeray: the saved state of %s rank %s has schema %r, this moeray reads %d: ignored",
                    app_name, rank, record.get("schema") if isinstance(record, dict) else None, SCHEMA)
        return None
    return record


def write_record(app_name: str, rank, record: dict) -> None:
    _kv()._internal_kv_put(state_key(app_name, rank), json.dumps(record).encode(), overwrite=True,
                           namespace=NAMESPACE)


def clear_app(app_name: str) -> int:
    """Forget every replica's record of `app_name` (a fresh deployment). Returns how many there were."""
    kv = _kv()
    keys = kv._internal_kv_list(f"serve-state/{app_name}/", namespace=NAMESPACE)
    for key in keys:
        kv._internal_kv_del(key, namespace=NAMESPACE)
    return len(keys)


def fingerprint(engine_config, checkpoint: str) -> dict:
    """What a saved placement must agree with to be reused: the model's shape and the slot count."""
    model = engine_config.model
    return {"checkpoint": str(checkpoint), "architecture": model.architecture, "num_moe_layers": model.num_moe_layers,
            "num_experts": model.num_experts, "slots_per_worker": engine_config.slots_per_worker}


def resume_placement(record: dict | None, engine_config, checkpoint: str) -> tuple[Placement | None, str]:
    """The saved placement (with its replica split weights) if it fits this engine, else None; and
    one line saying which and why (for the replica's log and /v1/placement)."""
    if record is None:
        return None, "no saved state: contiguous placement"
    want = fingerprint(engine_config, checkpoint)
    saved = record.get("fingerprint") or {}
    differs = [f"{k}={saved.get(k)!r} (now {v!r})" for k, v in want.items() if saved.get(k) != v]
    if differs:
        return None, (f"saved placement v{record.get('version')} is for another model or slot count "
                      f"({', '.join(differs)}): contiguous placement")
    workers = engine_config.parallel.num_workers
    if record.get("num_workers") != workers:
        return None, (f"saved placement v{record.get('version')} has {record.get('num_workers')} workers, the config "
                      f"asks for {workers}: contiguous placement")
    model = engine_config.model
    weights = record.get("replica_weights")
    widths = record.get("shard_width")  # absent in records saved before shard widths were kept
    note = ""
    try:
        slots = np.asarray(record["phy2log"], dtype=np.int64)
        version = int(record["version"])
        # Shard widths belong to the slot map (without them a sharded one means other experts'
        # bytes): a record whose widths do not fit is not used at all.
        widths = None if widths is None else np.asarray(widths, dtype=np.float64)
        bare = Placement(slots, model.num_experts, engine_config.slots_per_worker, version,
                         shard_width=widths).validate()
    except (KeyError, TypeError, ValueError) as exc:
        return None, f"saved placement v{record.get('version')} is not valid ({exc}): contiguous placement"
    placement = bare
    if weights is not None:
        try:
            placement = Placement(slots, model.num_experts, engine_config.slots_per_worker, version,
                                  replica_weights=np.asarray(weights, dtype=np.float64), shard_width=widths).validate()
        except (TypeError, ValueError) as exc:
            note = f" (its replica split weights are not valid, {exc}: equal split)"
    return placement, (f"resumed placement v{placement.version} saved by replica {record.get('replica')} at "
                       f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(record.get('saved_at', 0)))}{note}")


def _plain(value):
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    return value


class StateSaver:
    """Saves this replica's record whenever its engine's committed placement (or its rebalance log)
    changes. `note(engine)` runs on the engine-loop thread (the only one that may touch the engine):
    it compares the placement version with the last one noted and, only when it moved (or when
    asked to refresh the log), hands a copy of the placement and the coordinator's handle to the
    saver's thread. `carried_log` is the log the previous replicas of this rank left (each entry
    names the replica that ran it); this replica's own entries follow it."""

    def __init__(self, app_name: str, rank, replica: str, checkpoint: str, carried_log: list[dict] | None = None,
                 noted_version: int | None = None):
        self.app_name, self.rank, self.replica, self.checkpoint = app_name, rank, replica, str(checkpoint)
        self.key = state_key(app_name, rank)
        self.carried_log = list(carried_log or [])
        self._own_log: dict[int, dict] = {}  # version -> entry of this replica's coordinator
        self._noted_version = noted_version  # None: the first note saves
        self._pending: dict | None = None
        self._cond = threading.Condition()
        self._last_written: str | None = None
        self.saved_version: int | None = None
        self.saves = 0
        self.last_error: str | None = None
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="moeray-state-saver", daemon=True)
        self._thread.start()

    # ---- the engine-loop thread ------------------------------------------------------------------
    def note(self, engine, refresh_log: bool = False) -> None:
        """Call between steps on the engine-loop thread. Never raises."""
        try:
            p = engine.placement()
            if p.version == self._noted_version and not refresh_log:
                return
            self._noted_version = p.version
            snapshot = {"phy2log": np.array(p.phy2log), "version": int(p.version), "num_workers": p.num_workers,
                        "replica_weights": None if p.replica_weights is None else np.array(p.replica_weights),
                        "shard_width": None if p.shard_width is None else np.array(p.shard_width),
                        "fingerprint": fingerprint(engine.config, self.checkpoint),
                        "coordinator": engine.coordinator}
        except Exception:  # noqa: BLE001 - saving is best-effort; it must never fail a step
            log.exception("moeray: noting the placement for the saved state failed")
            return
        with self._cond:
            self._pending = snapshot  # the latest wins: an older one not yet written is dropped
            self._cond.notify()

    # ---- the saver's thread ----------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while self._pending is None and not self._stopped:
                    self._cond.wait()
                if self._stopped:
                    return
                snapshot, self._pending = self._pending, None
            try:
                self._save(snapshot)
                self.last_error = None
            except Exception as exc:  # noqa: BLE001 - logged and shown in /v1/placement; the next change retries
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("moeray: saving the replica state to %s failed: %s", self.key, self.last_error)

    def _save(self, snapshot: dict) -> None:
        coordinator = snapshot.pop("coordinator")
        if coordinator is not None:
            import ray

            try:
                view = ray.get(coordinator.view.remote(False), timeout=_COORDINATOR_TIMEOUT_S)
                for entry in view["rebalances"]:
                    self._own_log[int(entry["version"])] = {**_plain(entry), "replica": self.replica}
            except Exception as exc:  # noqa: BLE001 - the placement is saved anyway, with the log last seen
                log.warning("moeray: reading the rebalance log for the saved state failed: %s", exc)
        record = _plain({
            "schema": SCHEMA, "app": self.app_name, "rank": self.rank, "replica": self.replica,
            **snapshot, "rebalances": self.log()[-LOG_LIMIT:],
        })
        text = json.dumps({k: v for k, v in record.items() if k != "saved_at"}, sort_keys=True)
        if text == self._last_written:
            return
        record["saved_at"] = time.time()
        write_record(self.app_name, self.rank, record)
        self._last_written = text
        self.saved_version = snapshot["version"]
        self.saves += 1

    def log(self) -> list[dict]:
        """The carried log, then this replica's own entries by version."""
        return self.carried_log + [self._own_log[v] for v in sorted(self._own_log)]

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
