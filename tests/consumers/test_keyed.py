import asyncio

from consumers.keyed import KeyedSerializer


async def test_same_key_runs_in_order_while_other_keys_overtake() -> None:
    serializer = KeyedSerializer()
    gate = asyncio.Event()
    finished: list[str] = []

    async def slow_first() -> None:
        await gate.wait()
        finished.append("a1")

    async def record(name: str) -> None:
        finished.append(name)

    a1 = serializer.submit("a", slow_first)
    a2 = serializer.submit("a", lambda: record("a2"))
    b1 = serializer.submit("b", lambda: record("b1"))
    await asyncio.wait_for(b1, timeout=2)
    assert finished == ["b1"]  # b overtook a; a2 waits behind a1
    assert not a2.done()
    gate.set()
    await asyncio.wait_for(asyncio.gather(a1, a2), timeout=2)
    assert finished == ["b1", "a1", "a2"]
    assert serializer.active_keys == 0


async def test_a_failed_or_cancelled_predecessor_does_not_block_its_key() -> None:
    serializer = KeyedSerializer()
    blocked = asyncio.Event()

    async def boom() -> None:
        raise RuntimeError("handler bug")

    async def forever() -> None:
        await blocked.wait()

    done: list[int] = []

    async def mark() -> None:
        done.append(1)

    failing = serializer.submit("k", boom)
    hanging = serializer.submit("k", forever)
    after = serializer.submit("k", mark)
    await asyncio.wait({failing}, timeout=2)
    assert isinstance(failing.exception(), RuntimeError)
    hanging.cancel()
    await asyncio.wait_for(after, timeout=2)
    assert done == [1]


async def test_a_task_cancelled_before_it_ran_does_not_wedge_its_key() -> None:
    serializer = KeyedSerializer()
    ran: list[int] = []

    async def mark() -> None:
        ran.append(1)

    first = serializer.submit("k", mark)
    first.cancel()  # cancelled before its first step
    second = serializer.submit("k", mark)
    await asyncio.wait_for(second, timeout=2)
    assert ran == [1] and serializer.active_keys == 0
