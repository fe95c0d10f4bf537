"""A training's snapshot names its state twice, ``state`` and ``status``, and the two can
never disagree: ``status`` is derived, not a field one could set."""

from __future__ import annotations

from dataclasses import fields, replace
from typing import Any

import pytest
from pydantic import TypeAdapter

from core.training.status import TrainingStatus


def snapshot(**changes: Any) -> TrainingStatus:
    return replace(TrainingStatus("mia_1f3a9c0e", "r", "mia", "zqx", "queued", 0, 100),
                   **changes)


@pytest.mark.parametrize("state", ["queued", "training", "completed", "failed"])
def test_status_is_the_state_in_the_json(state: str) -> None:
    answer = snapshot(state=state, step=3).to_json()
    assert answer["status"] == answer["state"] == state
    assert answer["step"] == 3
    assert TypeAdapter(TrainingStatus).dump_python(snapshot(state=state)) == \
        snapshot(state=state).to_json()  # what the OpenAPI document describes


def test_status_cannot_be_given() -> None:
    assert "status" not in {f.name for f in fields(TrainingStatus)}
    with pytest.raises(TypeError, match="status"):
        TrainingStatus("t", "r", "mia", "zqx", "queued", 0, 1, status="failed")  # type: ignore[call-arg]
