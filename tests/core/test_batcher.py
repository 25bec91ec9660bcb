"""`Batcher`: concurrent loads share a query, and every caller gets its own key's outcome."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import pytest

from app.core.localcache import Batcher


class Recorder:
    """A `load_many` that notes each batch and answers after `gate` opens."""

    def __init__(self, *, fail_keys: frozenset[str] = frozenset(), broken: bool = False) -> None:
        self.batches: list[list[str]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.fail_keys = fail_keys
        self.broken = broken

    async def __call__(self, keys: list[str]) -> Mapping[str, str | Exception]:
        self.batches.append(list(keys))
        await self.gate.wait()
        if self.broken:
            raise ConnectionError("database gone")
        return {k: (KeyError(k) if k in self.fail_keys else k.upper()) for k in keys}


async def started(batcher: Batcher[str, str], key: str) -> asyncio.Task[str]:
    task = asyncio.create_task(batcher.load(key))
    for _ in range(3):  # the caller's task, then the batch task it starts
        await asyncio.sleep(0)
    return task


async def test_an_idle_load_starts_at_once_and_keys_asked_meanwhile_share_the_next_batch() -> None:
    load = Recorder()
    load.gate.clear()
    batcher: Batcher[str, str] = Batcher(load)

    first = await started(batcher, "a")
    assert load.batches == [["a"]]  # not held back waiting for company
    others = [await started(batcher, k) for k in "bcdb"]
    assert load.batches == [["a"]]  # queued behind the batch in flight
    load.gate.set()

    assert await first == "A"
    assert [await t for t in others] == ["B", "C", "D", "B"]
    assert load.batches == [["a"], ["b", "c", "d"]]  # equal keys loaded once


async def test_max_batch_splits_a_long_queue() -> None:
    load = Recorder()
    load.gate.clear()
    batcher: Batcher[str, str] = Batcher(load, max_batch=2)
    tasks = [await started(batcher, k) for k in "abcde"]
    load.gate.set()
    assert [await t for t in tasks] == list("ABCDE")
    assert load.batches == [["a"], ["b", "c"], ["d", "e"]]


async def test_a_key_answered_with_an_exception_fails_only_its_callers() -> None:
    batcher: Batcher[str, str] = Batcher(Recorder(fail_keys=frozenset({"b"})))
    results = await asyncio.gather(*(batcher.load(k) for k in "abc"), return_exceptions=True)
    assert results[0] == "A"
    assert results[2] == "C"
    assert isinstance(results[1], KeyError)


async def test_a_failed_batch_fails_the_keys_queued_behind_it_and_nothing_stays_stuck() -> None:
    load = Recorder(broken=True)
    load.gate.clear()
    batcher: Batcher[str, str] = Batcher(load)
    first = await started(batcher, "a")
    second = await started(batcher, "b")
    load.gate.set()
    with pytest.raises(ConnectionError):
        await first
    with pytest.raises(ConnectionError):
        await second
    assert load.batches == [["a"]]  # "b" met a's failure instead of a second one
    load.broken = False
    assert await batcher.load("a") == "A"  # nothing stuck


async def test_a_cancelled_batch_fails_its_callers_with_the_error_chosen() -> None:
    load = Recorder()
    load.gate.clear()
    batcher: Batcher[str, str] = Batcher(load, cancelled_error=LookupError)
    waiting = [await started(batcher, k) for k in "ab"]
    assert batcher._task is not None
    batcher._task.cancel()
    results = await asyncio.gather(*waiting, return_exceptions=True)
    assert all(isinstance(r, LookupError) for r in results), results


async def test_a_caller_giving_up_does_not_cancel_the_load_for_the_others() -> None:
    load = Recorder()
    load.gate.clear()
    batcher: Batcher[str, str] = Batcher(load)
    impatient = await started(batcher, "a")
    patient = await started(batcher, "a")
    impatient.cancel()
    load.gate.set()
    assert await patient == "A"
    assert impatient.cancelled()


async def test_a_key_left_out_of_the_answer_fails_instead_of_hanging() -> None:
    async def forgetful(keys: list[str]) -> Mapping[str, str | Exception]:
        return {}

    batcher: Batcher[str, str] = Batcher(forgetful)
    with pytest.raises(LookupError):
        await asyncio.wait_for(batcher.load("a"), 1.0)


async def test_an_own_load_given_up_cancels_only_its_result_and_the_batch_goes_on() -> None:
    load = Recorder()
    load.gate.clear()
    batcher: Batcher[str, str] = Batcher(load)
    running = await started(batcher, "a")
    given_up = asyncio.create_task(batcher.load_own("b"))
    kept = asyncio.create_task(batcher.load_own("c"))
    await asyncio.sleep(0)
    given_up.cancel()
    load.gate.set()

    assert await running == "A"
    assert await kept == "C"
    assert given_up.cancelled()
    assert load.batches == [["a"], ["b", "c"]]  # "b" was loaded all the same
