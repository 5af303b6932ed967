"""Fixtures of the actors tests that several modules share."""

import pytest


@pytest.fixture(scope="session")
def service(ray_cluster, tmp_path_factory):
    """One Serve app on the built-in tiny model (2 CPU workers) for every HTTP test module."""
    serve = pytest.importorskip("ray.serve", reason="needs ray[serve] (pip install -e '.[serve]')")
    from moeray.config import EngineOptions, ParallelConfig, RebalanceConfig
    from moeray.serving.config import ServeConfig, ServiceConfig
    from moeray.serving.deployment import run_service
    from tests.actors.serving_app import CONTEXT, VOCAB, Service, free_port
    from tests.helpers import make_checkpoint

    ckpt, model_cfg, reference = make_checkpoint(tmp_path_factory.mktemp("serve"), seed=5, vocab_size=VOCAB,
                                                 num_experts=8, top_k=2)
    config = ServiceConfig(
        checkpoint=ckpt,
        engine=EngineOptions(parallel=ParallelConfig(num_workers=2, redundant_slots_per_worker=1,
                                                     collective_timeout_s=30),
                             rebalance=RebalanceConfig(enabled=False, min_tokens=0)),
        serve=ServeConfig(port=free_port(), max_tokens_per_request=CONTEXT, app_name="moeray-test",
                          model_name="tiny-moe"),
    )
    run_service(config, blocking=False)
    yield Service(config.serve.port, ckpt, model_cfg, reference, "tiny-moe")
    serve.shutdown()
