"""The driver's scheduler without Ray: admission by tokens in flight and KV use, the KV budget,
FIFO without overtaking, the prefill budget, aborts and requeueing after a recovery."""

import pytest

from moeray.generation.messages import SequenceUpdate, StepResult
from moeray.generation.sampling import SamplingParams
from moeray.generation.scheduler import Scheduler


def _finish(*request_ids) -> list[StepResult]:
    updates = tuple(SequenceUpdate(r, (5,), (), "length") for r in request_ids)
    return [StepResult(updates, 0, 0, 0)]


def test_requests_spread_over_workers_by_tokens_this_step():
    sched = Scheduler(num_workers=3, blocks_per_worker=100, block_size=4, max_model_len=512)
    for i, size in enumerate((40, 8, 8, 8)):
        sched.add(f"r{i}", range(size), SamplingParams(max_tokens=4))
    plans = sched.plan()
    placed = {seq.request_id: w for w, plan in enumerate(plans) for seq in plan.new}
    # r0 (40 tokens) on worker 0; r1, r2 on the empty workers 1 and 2; r3 on the lighter of those.
    assert placed["r0"] == 0 and {placed["r1"], placed["r2"]} == {1, 2} and placed["r3"] in (1, 2)
    assert all(seq.num_blocks == -(-(len(seq.prompt_ids) + 4) // 4) for plan in plans for seq in plan.new)


def test_kv_budget_queues_in_order_and_frees_on_finish():
    sched = Scheduler(num_workers=1, blocks_per_worker=10, block_size=4, max_model_len=512)
    sched.add("big", range(20), SamplingParams(max_tokens=12))  # 8 blocks
    sched.add("next", range(4), SamplingParams(max_tokens=8))  # 3 blocks: does not fit beside "big"
    sched.add("small", range(1), SamplingParams(max_tokens=3))  # 1 block: would fit, but may not overtake
    assert [s.request_id for s in sched.plan()[0].new] == ["big"]
    assert sched.plan()[0].new == () and sched.kv_usage() == [0.8]
    sched.update(_finish("big"))
    assert [s.request_id for s in sched.plan()[0].new] == ["next", "small"]


def test_a_request_larger_than_a_worker_is_refused_naming_the_sizes():
    sched = Scheduler(num_workers=2, blocks_per_worker=4, block_size=4, max_model_len=512)
    with pytest.raises(ValueError, match=r"needs 5 KV blocks \(10 prompt tokens \+ max_tokens=10\).*only 4"):
        sched.add("r", range(10), SamplingParams(max_tokens=10))
    with pytest.raises(ValueError, match="already in use"):
        sched.add("x", [1], SamplingParams(max_tokens=2))
        sched.add("x", [1], SamplingParams(max_tokens=2))


def test_prefill_budget_and_max_num_seqs_limit_a_step():
    sched = Scheduler(num_workers=1, blocks_per_worker=1000, block_size=4, max_model_len=512, max_num_seqs=3,
                      max_num_batched_tokens=50)
    for i in range(5):
        sched.add(f"r{i}", range(20), SamplingParams(max_tokens=1))
    assert len(sched.plan()[0].new) == 2  # 40 of 50 prompt tokens; a third would exceed the budget
    assert len(sched.plan()[0].new) == 1  # max_num_seqs = 3
    sched.add("huge", range(80), SamplingParams(max_tokens=1))
    sched.update(_finish("r0", "r1", "r2"))
    assert [s.request_id for s in sched.plan()[0].new] == ["r3", "r4"]
    sched.update(_finish("r3", "r4"))
    assert [s.request_id for s in sched.plan()[0].new] == ["huge"]  # larger than the budget: runs alone


def test_abort_reaches_the_worker_once_and_requeue_keeps_order():
    sched = Scheduler(num_workers=2, blocks_per_worker=100, block_size=4, max_model_len=512)
    for i in range(3):
        sched.add(f"r{i}", range(4), SamplingParams(max_tokens=4))
    plans = sched.plan()
    owner = next(w for w, p in enumerate(plans) if any(s.request_id == "r1" for s in p.new))
    sched.abort("r1")
    assert sched.plan()[owner].abort == ("r1",) and sched.plan()[owner].abort == ()
    lost = sched.requeue_all()
    assert [r.request_id for r in lost] == ["r0", "r2"] and sched.kv_usage() == [0.0, 0.0]
    assert sorted(s.request_id for p in sched.plan() for s in p.new) == ["r0", "r2"]
