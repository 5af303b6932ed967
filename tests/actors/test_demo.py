"""The README's main job, `moeray demo`, end to end at a small size."""

from moeray.demo import DemoOptions, run_demo


def test_demo_runs_checks_the_reference_and_rebalances(ray_cluster, capsys):
    result = run_demo(DemoOptions(workers=3, experts=8, layers=2, steps=12, tokens_per_step=96, zipf=1.5))
    out = capsys.readouterr().out
    assert result["max_rel_error"] <= 1e-5
    assert "per-worker load" in out and "per-expert load" in out
    assert result["load_LE"].sum() == 2 * 2 * 12 * 96  # layers x top-k x steps x tokens
