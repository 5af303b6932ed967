"""The README's main job, `moeray demo`, end to end at a small size."""

from moeray.demo import DemoOptions, run_demo


def test_demo_generates_checks_the_reference_and_rebalances(ray_cluster, capsys):
    result = run_demo(DemoOptions(workers=3, experts=8, layers=2, requests=24, prompt_tokens=32, max_tokens=12,
                                  zipf=1.5))
    out = capsys.readouterr().out
    assert result["matches_reference"]
    assert "per-worker load" in out and "per-expert load" in out and "equals the single-process reference: True" in out
    assert 0 < result["generated_tokens"] <= 24 * 12
    assert all(o.outputs[0].finish_reason in ("stop", "length") for o in result["outputs"])
    assert result["rebalances"], "the skewed prompts must trigger a live rebalance"
