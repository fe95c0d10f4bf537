"""GET /train-lora/{training_id} answers the state under ``status``, the field POST
/train-lora answers it under (and under ``state`` as before)."""

from __future__ import annotations

from typing import Any

from tests.core.test_training_images import photos
from tests.http.conftest import Serve, Served
from tests.http.forms import form


async def snapshot(served: Served, training_id: str) -> dict[str, Any]:
    async with served.client.get(f"/train-lora/{training_id}") as response:
        assert response.status == 200
        body: dict[str, Any] = await response.json()
        return body


async def test_get_and_post_name_the_state_status(serve: Serve) -> None:
    served = await serve()
    pictures = photos(5)
    async with served.client.post("/train-lora", data=form(pictures)) as response:
        posted = await response.json()
        assert response.status == 200, posted
    assert posted["status"] == "training_started"

    early = await snapshot(served, posted["training_id"])
    assert early["status"] == early["state"] in ("queued", "training", "completed")
    done = await served.training.wait(posted["training_id"])
    assert done is not None and done.state == "completed"
    final = await snapshot(served, posted["training_id"])
    assert final["status"] == final["state"] == "completed"
    assert final["lora_id"] == done.lora_id

    async with served.client.post(
            "/train-lora", data=form(pictures, request_id=posted["request_id"])) as response:
        again = await response.json()
        assert response.status == 200, again
    assert again["status"] == "completed" == final["status"]  # the same word for it
