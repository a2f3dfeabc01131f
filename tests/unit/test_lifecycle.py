"""Stopping background tasks: :func:`kvrouter.lifecycle.cancel_and_wait`."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import pytest

from kvrouter.lifecycle import cancel_and_wait


async def test_cancels_and_waits_for_every_task() -> None:
    ended: list[str] = []

    async def loop(name: str) -> None:
        try:
            await asyncio.Event().wait()
        finally:
            ended.append(name)

    tasks = [asyncio.create_task(loop(name)) for name in "ab"]
    await asyncio.sleep(0)
    await cancel_and_wait(tasks[0], None, tasks[1])
    assert sorted(ended) == ["a", "b"]
    assert all(task.cancelled() for task in tasks)


async def test_a_task_that_loses_its_cancel_is_cancelled_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # What CPython 3.11's wait_for does when the cancel meets its inner result: the
    # task goes on as if never cancelled, here into another wait that never ends.
    swallowed = asyncio.Event()

    async def forgetful() -> None:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.Event().wait()
        swallowed.set()
        await asyncio.Event().wait()

    task = asyncio.create_task(forgetful())
    await asyncio.sleep(0)
    with caplog.at_level(logging.WARNING, logger="kvrouter.lifecycle"):
        await asyncio.wait_for(cancel_and_wait(task, grace_s=0.05), 5.0)
    assert swallowed.is_set() and task.cancelled()
    assert "did not end" in caplog.text


async def test_a_cancel_of_the_caller_is_not_swallowed() -> None:
    release = asyncio.Event()

    async def slow_to_stop() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            await release.wait()  # a cleanup that takes a while

    task = asyncio.create_task(slow_to_stop())
    await asyncio.sleep(0)
    stopper = asyncio.create_task(cancel_and_wait(task, grace_s=10.0))
    await asyncio.sleep(0.01)
    stopper.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stopper
    release.set()
    await asyncio.wait_for(asyncio.wait({task}), 5.0)
    assert task.cancelled()


async def test_failed_and_finished_tasks_are_accepted_quietly() -> None:
    async def fail() -> None:
        raise RuntimeError("boom")

    async def finish() -> int:
        return 1

    failed, finished = asyncio.create_task(fail()), asyncio.create_task(finish())
    await asyncio.wait({failed, finished})
    await cancel_and_wait(failed, finished)  # retrieves the exception, raises nothing
    assert isinstance(failed.exception(), RuntimeError) and finished.result() == 1
