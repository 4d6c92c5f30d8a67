"""The relay's own task handling, apart from Redis and gRPC."""

import asyncio

from agent_service._relay import _stop


async def test_a_helper_stopped_while_its_owner_is_cancelled_again_and_again_still_ends() -> None:
    # The relay's close cancels its subscription repeatedly while the subscription, in a finally, stops its own
    # helper task; the helper used to be left pending and unreferenced ("Task was destroyed but it is pending").
    loop = asyncio.get_running_loop()

    async def slow_to_end() -> None:
        # Ends 0.3 s after it starts whatever it is told, as a helper whose cancellation a timeout swallowed does.
        deadline = loop.time() + 0.3
        while loop.time() < deadline:
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                pass

    helper = asyncio.create_task(slow_to_end())

    async def owner() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            await _stop(helper)

    owner_task = asyncio.create_task(owner())
    await asyncio.sleep(0)
    await _stop(owner_task)

    assert owner_task.cancelled()
    assert helper.done()
