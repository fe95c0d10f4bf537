"""A malformed ``init_image_url`` is a 422 naming the field, never a 500: the URL is
checked before anything is resolved or sent (core/net/safe_fetch.py)."""

from __future__ import annotations

from tests.http.conftest import Serve

MALFORMED = {
    "http://127.0.0.1:99999/x.png": "the port must be 1 to 65535",  # was OverflowError
    f"http://a{'b' * 70}.com/x.png": "longer than 63 characters",  # was UnicodeError (IDNA)
}


async def test_a_malformed_init_image_url_is_422_naming_the_field(serve: Serve) -> None:
    served = await serve(lora_fetch_allowed_hosts="127.0.0.1")
    for url, reason in MALFORMED.items():
        response = await served.client.post("/generate/image", json={
            "prompt": "a park", "width": 64, "height": 64, "num_inference_steps": 2,
            "init_image_url": url})
        body = await response.json()
        assert response.status == 422, body
        assert body["error_code"] == "INVALID_REQUEST"
        [detail] = body["detail"]
        assert detail["loc"] == ["body", "init_image_url"], detail
        assert detail["msg"].startswith("init_image_url: not a valid URL") and reason in \
            detail["msg"], detail
