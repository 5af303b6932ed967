import pytest
from pydantic import ValidationError

from moeray.config import EngineConfig, ParallelConfig, tiny_model_config


def test_top_k_above_experts_is_rejected_naming_both_values():
    with pytest.raises(ValidationError, match=r"top_k=9 > num_experts=8"):
        tiny_model_config(num_experts=8, top_k=9)


def test_fewer_slots_than_experts_is_rejected_naming_the_numbers():
    with pytest.raises(ValidationError, match=r"num_workers=2 x slots_per_worker=3 = 6 slots < num_experts=8"):
        EngineConfig(model=tiny_model_config(num_experts=8), parallel=ParallelConfig(num_workers=2, slots_per_worker=3))


def test_zero_workers_is_rejected():
    with pytest.raises(ValidationError, match=r"num_workers"):
        ParallelConfig(num_workers=0)


def test_group_limited_routing_must_divide_experts():
    with pytest.raises(ValidationError, match=r"num_experts=10 is not divisible by n_group=4"):
        tiny_model_config(num_experts=10, n_group=4, topk_group=2)
    with pytest.raises(ValidationError, match=r"top_k=5 > topk_group=1 x 4 experts per group"):
        tiny_model_config(num_experts=8, top_k=5, n_group=2, topk_group=1)


def test_unknown_keys_are_rejected():
    with pytest.raises(ValidationError, match="num_expert"):
        EngineConfig.model_validate({"model": {**tiny_model_config().model_dump(), "num_expert": 3}})


def test_default_slots_cover_experts_not_divisible_by_workers():
    cfg = EngineConfig(model=tiny_model_config(num_experts=7), parallel=ParallelConfig(num_workers=3, redundant_slots_per_worker=1))
    assert cfg.slots_per_worker == 4  # ceil(7 / 3) + 1


def test_yaml_round_trip(tmp_path):
    import yaml

    cfg = EngineConfig(model=tiny_model_config(), parallel=ParallelConfig(num_workers=2))
    path = tmp_path / "engine.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump()))
    assert EngineConfig.from_yaml(path) == cfg


def test_cache_limits_and_the_context_limit():
    from moeray.config import CacheConfig

    with pytest.raises(ValidationError, match="block_size"):
        CacheConfig(block_size=0)
    assert CacheConfig(block_size=16, kv_tokens_per_worker=33).blocks_per_worker == 3
    model = tiny_model_config(max_position_embeddings=1024)
    assert EngineConfig(model=model).max_model_len == 1024
    assert EngineConfig(model=model, cache=CacheConfig(max_model_len=100)).max_model_len == 100
    assert EngineConfig(model=model, cache=CacheConfig(max_model_len=5000)).max_model_len == 1024


def test_engine_options_take_everything_but_the_model():
    from moeray.config import EngineOptions

    opts = EngineOptions.model_validate({"parallel": {"num_workers": 3}, "dtype": "bfloat16"})
    assert opts.parallel.num_workers == 3 and opts.dtype == "bfloat16"
    with pytest.raises(ValidationError, match="model"):
        EngineOptions.model_validate({"model": {}})


def test_host_tier_config_names_bad_values_and_live_tiering_needs_stats():
    from moeray.config import StatsConfig
    from moeray.tier_config import HostTierConfig

    model = tiny_model_config(num_experts=8)
    with pytest.raises(ValidationError, match="device_slots"):
        EngineConfig(model=model, tier={"device_slots": "2"})  # strict: a string is not a slot count
    with pytest.raises(ValidationError, match="cold_path"):
        HostTierConfig(device_slots=1, cold_path="disk")
    with pytest.raises(ValidationError, match="margin"):
        HostTierConfig(margin=float("nan"))
    with pytest.raises(ValidationError, match="host_margin"):
        HostTierConfig(host_margin=1.0)  # a host bet that must save everything: never
    with pytest.raises(ValidationError, match="launch_thread"):
        HostTierConfig(launch_thread="yes")  # strict: a string is not a switch
    assert not HostTierConfig().launch_thread  # inline by default (measured as fast or faster)
    with pytest.raises(ValidationError, match="payback_steps"):
        HostTierConfig(payback_steps=float("inf"))
    with pytest.raises(ValidationError, match="needs stats.enabled=True"):
        EngineConfig(model=model, stats=StatsConfig(enabled=False), rebalance={"enabled": False},
                     tier={"device_slots": 1})
    config = EngineConfig(model=model, parallel=ParallelConfig(num_workers=2), rebalance={"enabled": False},
                          tier={"device_slots": 1})
    assert config.slots_per_worker == 4 and config.tier.device_slots_of(4) == 1 and config.coordinator_ticks
    assert HostTierConfig(device_slots=9).device_slots_of(4) == 4  # a budget above the slots: all on the device
    static = EngineConfig(model=model, rebalance={"enabled": False}, tier={"device_slots": 1, "tiering": "static"})
    assert not static.coordinator_ticks
