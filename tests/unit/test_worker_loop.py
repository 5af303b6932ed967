"""The worker's own step loop on one in-process worker (no Ray cluster): numbered messages taken in
order without gaps, merged output, aborts before admission, stop, errors reported by the drain.
The lockstep agreement across several workers runs in tests/actors (every generation test)."""

import time

import numpy as np
import pytest

from moeray.generation.messages import NewSequence, SequenceUpdate, StepPlan
from moeray.generation.reference import greedy_generate
from moeray.generation.sampling import SamplingParams, TokenLogprobs
from moeray.worker_loop import LoopMessage, WorkerLoop, merge_updates
from tests.helpers import make_checkpoint, single_worker

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


def _new(request_id: str, prompt: list[int], params: SamplingParams = GREEDY) -> NewSequence:
    return NewSequence(request_id, tuple(prompt), params, num_blocks=8)


def _drain_until(loop: WorkerLoop, done, deadline_s: float = 60.0) -> dict[str, SequenceUpdate]:
    """Merged updates per request until done(merged) holds."""
    merged: dict[str, list[SequenceUpdate]] = {}
    deadline = time.monotonic() + deadline_s
    while True:
        report = loop.drain(0.5)
        assert report.error is None, report.error
        for u in report.result.updates:
            merged.setdefault(u.request_id, []).append(u)
        view = {rid: merge_updates(us)[0] for rid, us in merged.items()}
        if done(view):
            return view
        assert time.monotonic() < deadline, f"no progress: {view}"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    ckpt, cfg, reference = make_checkpoint(tmp_path_factory.mktemp("loop"), seed=3, family="mixtral")
    return ckpt, reference


@pytest.fixture
def loop(model):
    worker = single_worker(model[0])
    loop = WorkerLoop(worker)
    loop.start()
    yield loop
    assert loop.abandon(30)


def test_merge_updates_concatenates_one_sequences_steps_in_order():
    lp = [TokenLogprobs(t, -float(t), ()) for t in range(3)]
    logits = np.ones((2, 4), dtype=np.float32)
    merged = merge_updates([SequenceUpdate("a", (1,), (lp[0],)), SequenceUpdate("b", (7,)),
                            SequenceUpdate("a", (2,), (lp[1],), prompt_logits_TV=logits),
                            SequenceUpdate("a", (3,), (lp[2],), "length")])
    a, b = merged
    assert (a.request_id, a.token_ids, a.logprobs, a.finish_reason) == ("a", (1, 2, 3), tuple(lp), "length")
    assert a.prompt_logits_TV is logits and b.token_ids == (7,) and b.finish_reason is None


def test_messages_are_taken_in_number_order_and_outputs_equal_the_reference(loop, model):
    _, reference = model
    prompts = {"p": [5, 6, 7, 8], "q": [9, 10]}
    loop.submit(LoopMessage(2, StepPlan(new=(_new("q", prompts["q"]),))))
    assert not loop.drain(0.3).result.updates  # message 1 is missing: nothing may run yet
    assert loop._seen == 0 and not loop._pending_new and not loop.worker.runner.sequences
    loop.submit(LoopMessage(1, StepPlan(new=(_new("p", prompts["p"]),))))
    out = _drain_until(loop, lambda v: all(v.get(r) and v[r].finish_reason for r in prompts))
    for rid, prompt in prompts.items():
        assert list(out[rid].token_ids) == greedy_generate(reference, prompt, GREEDY.max_tokens)
        assert out[rid].finish_reason == "length"
    report = loop.drain(0.1)
    assert report.result.num_running == 0 and report.result.blocks_used == 0


def test_a_sequence_aborted_before_admission_never_runs(loop, model):
    loop.submit(LoopMessage(2, StepPlan(abort=("gone",), new=(_new("kept", [3, 4]),))))
    loop.submit(LoopMessage(1, StepPlan(new=(_new("gone", [5, 6, 7]),))))
    out = _drain_until(loop, lambda v: v.get("kept") is not None and v["kept"].finish_reason is not None)
    assert "gone" not in out


def test_stop_ends_the_loop_and_an_error_reaches_the_drain(model):
    worker = single_worker(model[0])
    stopped = WorkerLoop(worker)
    stopped.start()
    stopped.submit(LoopMessage(1, stop=True))
    stopped._thread.join(30)
    assert stopped.drain(0.1).ended and not stopped.running

    failing = WorkerLoop(worker)
    failing.start()
    failing.submit(LoopMessage(1, commit_version=7))  # nothing was staged for version 7
    failing._thread.join(30)
    report = failing.drain(0.1)
    assert report.ended and report.error is not None and "7" in str(report.error)


def test_an_abort_cancels_a_pending_admission_even_at_a_stop_and_an_id_may_be_reused(model):
    """In message order: new "x", abort "x", stop -> "x" never reaches the runner (its blocks stay
    free); abort of a running "r" then new "r" -> the new "r" runs."""
    worker = single_worker(model[0])
    loop = WorkerLoop(worker)
    loop.submit(LoopMessage(3, stop=True))
    loop.submit(LoopMessage(2, StepPlan(abort=("x",))))
    loop.submit(LoopMessage(1, StepPlan(new=(_new("x", [5, 6]),))))
    loop.start()
    loop._thread.join(30)
    assert loop.drain(0.1).ended and "x" not in worker.runner.sequences and worker.runner.allocator.num_used == 0

    loop = WorkerLoop(worker, generation=1)
    loop.start()
    long = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    loop.submit(LoopMessage(1, StepPlan(new=(_new("r", [3, 4], long),))))
    _drain_until(loop, lambda v: "r" in v)  # running
    loop.submit(LoopMessage(2, StepPlan(abort=("r",), new=(_new("r", [9, 9, 9]),))))
    out = _drain_until(loop, lambda v: v.get("r") is not None and v["r"].finish_reason is not None, 60)
    # The new "r" (6 tokens) ran and finished; had its admission been dropped with the abort, the old
    # "r" would have run on to its 40 tokens.
    assert out["r"].finish_reason == "length" and len(out["r"].token_ids) < 40
    assert not worker.runner.sequences
    assert loop.abandon(30)
