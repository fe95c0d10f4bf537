import asyncio

from consumers.keyed import KeyedTurns


async def test_same_key_waits_in_order_while_other_keys_go() -> None:
    turns = KeyedTurns()
    a1, a2, b1 = turns.join("a"), turns.join("a"), turns.join("b")
    assert a1.first and b1.first and not a2.first
    waiting = asyncio.create_task(a2.wait())
    await asyncio.wait_for(b1.wait(), timeout=2)  # b does not wait for a
    assert not waiting.done()
    a1.leave()
    await asyncio.wait_for(waiting, timeout=2)
    a2.leave()
    b1.leave()
    assert turns.active_keys == 0


async def test_a_turn_leaving_early_keeps_its_successor_behind_the_first() -> None:
    # a2 is cancelled while a1 still runs: a3 must keep waiting for a1, not go at once
    turns = KeyedTurns()
    a1, a2, a3 = turns.join("a"), turns.join("a"), turns.join("a")
    third = asyncio.create_task(a3.wait())
    a2.leave()
    await asyncio.sleep(0)  # let the task run up to its wait
    assert not third.done() and not a3.first
    a1.leave()
    await asyncio.wait_for(third, timeout=2)
    a3.leave()
    assert turns.active_keys == 0


async def test_leave_is_idempotent_and_never_wedges_a_key() -> None:
    turns = KeyedTurns()
    first = turns.join("k")
    first.leave()
    first.leave()
    second = turns.join("k")
    await asyncio.wait_for(second.wait(), timeout=2)
    second.leave()
    assert turns.active_keys == 0


async def test_a_turn_urges_the_turns_ahead_of_it_only() -> None:
    turns = KeyedTurns()
    first, second, third = turns.join("k"), turns.join("k"), turns.join("k")
    other = turns.join("other")
    urged: list[str] = []
    first.on_urged(lambda: urged.append("first"))
    third.on_urged(lambda: urged.append("third"))
    other.on_urged(lambda: urged.append("other"))
    second.urge_ahead()
    second.urge_ahead()  # once each
    assert urged == ["first"]
    second.on_urged(lambda: urged.append("second"))  # not urged: none behind it asked
    third.urge_ahead()
    assert urged == ["first", "second"]
    late: list[str] = []
    first.on_urged(lambda: late.append("first"))  # registered after the urge: called at once
    assert late == ["first"]
    for turn in (first, second, third, other):
        turn.leave()
