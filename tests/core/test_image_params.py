import pytest

from core.image.params import ImageLimits, derive_seed, resolve_params
from schemas.errors import InvalidRequestError
from schemas.events import ImageRequested

LIMITS = ImageLimits(max_image_size=1024, max_inference_steps=50, default_steps=28,
                     default_guidance=3.5, default_size=512)


def request(**fields: object) -> ImageRequested:
    return ImageRequested.model_validate(
        {"request_id": "r-1", "conversation_id": "c", "prompt": "a cat", **fields})


def test_defaults_and_derived_seed() -> None:
    params = resolve_params(request(), LIMITS)
    assert (params.width, params.height, params.steps, params.guidance) == (512, 512, 28, 3.5)
    assert params.seed == derive_seed("r-1")
    assert params.seed != derive_seed("r-2")
    assert params.negative_prompt is None and params.optimize_prompt


@pytest.mark.parametrize(("max_image_size", "side"), [(512, 512), (500, 496), (4096, 1024)])
def test_a_request_without_sizes_gets_a_side_max_image_size_allows(
        max_image_size: int, side: int) -> None:
    """MAX_IMAGE_SIZE under FLUX's 1024 used to refuse every request that gave no size."""
    limits = ImageLimits(max_image_size=max_image_size)
    for fields in ({}, {"init_image_url": "https://example.com/a.png"}):
        params = resolve_params(request(**fields), limits)
        assert (params.width, params.height) == (side, side)


def test_explicit_seed_wins() -> None:
    assert resolve_params(request(seed=42), LIMITS).seed == 42


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"width": 1000}, "width"),            # not a multiple of 16
        ({"height": 520}, "height"),
        ({"width": 2048}, "width"),            # over MAX_IMAGE_SIZE
        ({"height": 32}, "height"),            # under the minimum
        ({"num_inference_steps": 51}, "num_inference_steps"),
        ({"guidance_scale": 31.0}, "guidance_scale"),
    ],
)
def test_invalid_fields_are_named(fields: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        resolve_params(request(**fields), LIMITS)
    assert info.value.field == field
    assert field in info.value.message


def test_negative_prompt_default_and_blank() -> None:
    limits = ImageLimits(default_negative_prompt="blurry", default_size=512)
    assert resolve_params(request(), limits).negative_prompt == "blurry"
    assert resolve_params(request(negative_prompt="  "), limits).negative_prompt is None
