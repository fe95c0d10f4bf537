"""Long text across requests, and what each request carries, against the local ElevenLabs:
request stitching by ``request-id`` on the models that take it, no context at all on
``eleven_v3`` (which refuses stitching ids and ``previous_text``/``next_text`` alike), the
seed and the character's pronunciation dictionaries on every part; and the local server
checking those fields as the real API does."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from core.outputs import OutputStore
from core.settings import ConfigurationError, load_settings
from core.voice import (
    ElevenLabsBackend,
    PronunciationDictionary,
    VoiceJob,
    VoiceService,
    build_voice_service,
)
from schemas.events import VoiceRequested
from tests.support.elevenlabs_server import DEFAULT_KEY, ElevenLabsServer, RecordingSleep

RACHEL = "21m00Tcm4TlvDq8ikWAM"
SARAH = "EXAVITQu4vr4xnSDxMaL"
DICTIONARIES = [{"id": "dictSarahNames01", "version_id": "ver0001"}, {"id": "dictSlang02"}]


def backend(http: httpx.AsyncClient, server: ElevenLabsServer) -> ElevenLabsBackend:
    return ElevenLabsBackend(http, server.api_url, SecretStr(DEFAULT_KEY), sleep=RecordingSleep())


def long_text(sentences: int) -> str:
    return " ".join(
        f"This is sentence number {i} of a long story, told slowly and with care." for i in
        range(sentences))


async def test_parts_on_multilingual_v2_are_stitched_by_the_request_id_before_them(
    http: httpx.AsyncClient, server: ElevenLabsServer, store: OutputStore
) -> None:
    server.seconds_per_char = 0.0002
    service = VoiceService(backend(http, server), store, RACHEL, max_text_chars=60_000)
    text = long_text(600)  # ~43,000 characters: 5 parts of at most 10,000
    result = await service.generate(VoiceJob(text, inject_emotion=False, seed=42))

    sent = server.tts_requests()
    assert len(sent) == 5 and all(r.status == 200 for r in sent)
    ids = [r.request_id for r in sent]
    assert all(ids) and len(set(ids)) == 5
    for i, part in enumerate(sent):
        assert part.json.get("previous_request_ids") == (ids[max(0, i - 3):i] or None)
        assert "previous_text" not in part.json  # the ids carry the continuity
        assert "next_request_ids" not in part.json  # the next part does not exist yet
        assert part.json["seed"] == 42
    for before, after in itertools.pairwise(sent):
        assert after.json["text"].startswith(before.json["next_text"])
    assert "next_text" not in sent[-1].json
    assert " ".join(r.json["text"] for r in sent) == text == result.enhanced_text
    assert store.exists(result.filename)


async def test_a_part_answered_without_a_request_id_is_followed_by_its_text(
    http: httpx.AsyncClient, server: ElevenLabsServer, store: OutputStore
) -> None:
    server.seconds_per_char = 0.0002
    server.send_request_ids = False  # as in ElevenLabs' zero retention mode
    service = VoiceService(backend(http, server), store, RACHEL, max_text_chars=30_000)
    await service.generate(VoiceJob(long_text(150), inject_emotion=False))
    first, second = server.tts_requests()
    assert "previous_request_ids" not in second.json
    assert first.json["text"].endswith(second.json["previous_text"])


async def test_parts_on_v3_carry_no_text_context_and_no_stitching_ids(
    http: httpx.AsyncClient, server: ElevenLabsServer, store: OutputStore
) -> None:
    service = VoiceService(backend(http, server), store, RACHEL)
    text = long_text(70)
    result = await service.generate(VoiceJob(text, model_id="eleven_v3", inject_emotion=False,
                                             seed=5))
    sent = server.tts_requests()
    assert len(sent) == 3 and all(r.status == 200 for r in sent)
    for part in sent:  # ElevenLabs refuses every one of these on v3 with 400
        assert not {"previous_request_ids", "next_request_ids", "previous_text",
                    "next_text"} & set(part.json)
        assert part.json["seed"] == 5
    in_order = sorted(sent, key=lambda r: text.index(r.json["text"]))  # sent concurrently
    assert " ".join(r.json["text"] for r in in_order) == text == result.enhanced_text
    assert store.exists(result.filename)


async def test_a_characters_dictionaries_go_with_every_part(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, http: httpx.AsyncClient,
    server: ElevenLabsServer, store: OutputStore,
) -> None:
    monkeypatch.chdir(tmp_path)  # no stray .env
    profiles = tmp_path / "profiles.json"
    profiles.write_text(json.dumps({"sarah": {"voice_id": SARAH,
                                              "pronunciation_dictionaries": DICTIONARIES}}))
    service = build_voice_service(
        load_settings(elevenlabs_api_key=DEFAULT_KEY, elevenlabs_api_url=server.api_url,
                      voice_profiles_path=profiles),
        store, http, sleep=RecordingSleep())
    await service.generate(VoiceRequested(
        request_id="d-1", conversation_id="c", character_id="sarah", text="Hi, Sarah here!"))
    await service.generate(VoiceRequested(
        request_id="d-2", conversation_id="c", character_id="nobody", text="Hi."))

    sarah, stranger = server.tts_requests()
    assert sarah.status == 200
    assert sarah.json["pronunciation_dictionary_locators"] == [
        {"pronunciation_dictionary_id": "dictSarahNames01", "version_id": "ver0001"},
        {"pronunciation_dictionary_id": "dictSlang02"},
    ]
    assert "pronunciation_dictionary_locators" not in stranger.json


@pytest.mark.parametrize(
    ("dictionaries", "where"),
    [
        ([{"id": f"d{i}"} for i in range(4)],
         "sarah.pronunciation_dictionaries: Tuple should have at most 3 items"),
        ([{"version_id": "v1"}], "sarah.pronunciation_dictionaries.0.id: Field required"),
        ([{"id": "d", "version": "v1"}], "sarah.pronunciation_dictionaries.0.version"),
        ([{"id": " "}], "sarah.pronunciation_dictionaries.0.id"),
        ("dictSarah", "sarah.pronunciation_dictionaries"),
    ],
)
def test_an_invalid_dictionary_list_stops_start_up_naming_it(
    tmp_path: Path, store: OutputStore, dictionaries: Any, where: str
) -> None:
    profiles = tmp_path / "profiles.json"
    profiles.write_text(json.dumps({"sarah": {"pronunciation_dictionaries": dictionaries}}))
    with pytest.raises(ConfigurationError, match="VOICE_PROFILES_PATH") as caught:
        build_voice_service(load_settings(voice_backend="local",
                                          voice_profiles_path=profiles), store)
    assert where in str(caught.value)


# --- the local server checks these fields as the real API does ---


async def post(http: httpx.AsyncClient, server: ElevenLabsServer, body: dict[str, Any]
               ) -> httpx.Response:
    return await http.post(f"{server.api_url}/text-to-speech/{RACHEL}",
                           headers={"xi-api-key": DEFAULT_KEY}, json={"text": "Hi.", **body})


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        ({"seed": 4_294_967_296}, ["body", "seed"]),
        ({"seed": -1}, ["body", "seed"]),
        ({"seed": "7"}, ["body", "seed"]),
        ({"pronunciation_dictionary_locators": [{"pronunciation_dictionary_id": "d"}] * 4},
         ["body", "pronunciation_dictionary_locators"]),
        ({"pronunciation_dictionary_locators": [{"version_id": "v"}]},
         ["body", "pronunciation_dictionary_locators", 0, "pronunciation_dictionary_id"]),
        ({"previous_request_ids": ["a", "b", "c", "d"]}, ["body", "previous_request_ids"]),
        ({"next_request_ids": [1]}, ["body", "next_request_ids", 0]),
    ],
)
async def test_the_local_server_refuses_malformed_fields_with_422(
    http: httpx.AsyncClient, server: ElevenLabsServer, body: dict[str, Any], loc: list[Any]
) -> None:
    response = await post(http, server, body)
    assert response.status_code == 422
    assert [e["loc"] for e in response.json()["detail"]] == [loc]


async def test_the_local_server_refuses_stitching_on_v3_and_ids_it_never_issued(
    http: httpx.AsyncClient, server: ElevenLabsServer
) -> None:
    issued = (await post(http, server, {})).headers["request-id"]
    on_v3 = await post(http, server, {"model_id": "eleven_v3",
                                      "previous_request_ids": [issued]})
    assert on_v3.status_code == 400
    assert on_v3.json()["detail"]["status"] == "unsupported_model"
    made_up = await post(http, server, {"previous_request_ids": ["nope"]})
    assert made_up.status_code == 400
    assert made_up.json()["detail"]["status"] == "request_id_not_found"
    fine = await post(http, server, {"previous_request_ids": [issued], "seed": 0,
                                     "pronunciation_dictionary_locators": [
                                         {"pronunciation_dictionary_id": "d",
                                          "version_id": None}]})
    assert fine.status_code == 200 and fine.headers["request-id"] != issued


def test_dictionary_model_matches_the_profile_file_shape() -> None:
    assert PronunciationDictionary.model_validate({"id": "d"}).version_id is None
