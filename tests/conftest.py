"""Shared fixtures. Tests never start more than one local Ray cluster per session."""

import os

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # token auth writes ~/.ray/auth_token otherwise
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole session; shut down only if this session started it."""
    import ray

    from moeray.ray_cluster import ensure_ray

    started = not ray.is_initialized()
    ensure_ray()
    yield ray
    if started:
        ray.shutdown()
