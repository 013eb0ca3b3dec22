"""Restore requests: one model for the JSON and the multipart form (`RestoreRequest`), checked against the [serve]
limits into one typed `RestoreCall`, which travels unchanged from parsing to the Restorer replica. Every refusal is a
`RequestError` with the HTTP status and the field it is about; nothing here is unpickled or evaluated (images are
decoded with size limits read from the header first). Parsing is CPU work (base64, JSON, image decoding): the
ingress runs `parse_json` / `parse_form` off its event loop."""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from restoration.errors import InputError
from restoration.images import ImageDecodeError, decode_image
from restoration.sampling.presets import with_sampler_preset
from restoration.settings import RestoreConfig, SamplerConfig
from serving.catalog import ModelRef
from serving.config import AppConfig, LimitsConfig, OutputFormat

FORM_FILE_FIELDS = ("image", "reference")


class RequestError(Exception):
    """A request the service refuses: `status` (4xx), the `field` it is about (None: the request as a whole)."""

    def __init__(self, status: int, message: str, field: str | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.status, self.message, self.field, self.retry_after = status, message, field, retry_after

    def body(self) -> dict[str, Any]:
        return {"error": self.message, "field": self.field}


class ErrorBody(BaseModel):
    """Every refusal's JSON body (4xx, 5xx)."""

    error: str = Field(description="What is wrong, naming the field or the limit.")
    field: str | None = Field(None, description="The request field it is about; null: the request as a whole.")
    request_id: str | None = Field(None, description="Serve's request id (also in the X-Request-Id header and the service's logs).")


class RestoreRequest(BaseModel):
    """The fields of POST /v1/restore and POST /v1/jobs (JSON body, or multipart form fields next to the files)."""

    model_config = ConfigDict(extra="forbid")

    image: str | None = Field(None, description="JSON only: the image, base64 (multipart: the `image` file).")
    prompt: str | None = Field(None, description="Semantic prompt; unset: the Captioner describes the stage-1 image.")
    restoration_prompt: str | None = Field(
        None, description="SPIRE restoration prompt, e.g. 'Deblur with sigma 2.0; Denoise with sigma 0.06'."
    )
    sampler: str | None = Field(None, description="Sampler preset (supir-paper, supir-release); unset: the service's defaults.")
    steps: int | None = Field(None, ge=1, description="Sampling steps.")
    cfg: float | None = Field(None, ge=1, allow_inf_nan=False, description="Classifier-free guidance scale.")
    tau_r: float | None = Field(None, ge=0, allow_inf_nan=False, description="Restoration-guidance exponent; 0: off.")
    control_scale: float | None = Field(None, ge=0, allow_inf_nan=False, description="Adaptor control scale.")
    seed: int | None = Field(None, ge=0, lt=2**63, description="Seed of the noise and the churn.")
    upscale: float | None = Field(None, gt=0, allow_inf_nan=False, description="Super-resolution factor.")
    references: Literal["none", "auto"] | list[str] = Field(
        "none", description="none, auto (retrieved from the index), or (JSON) base64 images; multipart: `reference` files."
    )
    retrieval_k: int | None = Field(None, ge=1, description="references=auto: how many to retrieve.")
    min_similarity: float | None = Field(None, ge=-1, le=1, allow_inf_nan=False, description="references=auto: cosine threshold.")
    experts: str | dict[str, float] | None = Field(
        None, description="ABAIR experts: soft, one_hot, or oracle weights ({'noise': 1.0}; in a form 'noise=1,blur=0.5')."
    )
    model: str | None = Field(None, description="Model name, one of GET /v1/models; unset: the service's default.")
    output_format: OutputFormat = Field("png", description="Format of the returned image.")


@dataclass
class Reference:
    """A ReFIR reference: uploaded (similarity None, source "upload:i") or retrieved from the index."""

    image: np.ndarray  # H x W x 3 uint8
    similarity: float | None
    source: str


@dataclass
class RestoreCall:
    """One checked request, from parsing to the Restorer: the decoded images and the settings `restore` runs with.
    The ingress fills `model` (the resolved ModelRef), `prompt` (a caption, when none was asked), `references`
    (retrieved, for "auto") and `job_id` (a job's restore) as it composes the deployments."""

    image: np.ndarray  # H x W x 3 uint8
    references: list[Reference] | Literal["auto"]
    prompt: str | None
    restoration_prompt: str | None
    sampler: SamplerConfig
    options: RestoreConfig
    expert_weights: str | dict[str, float] | None
    model_name: str | None  # as the request named it (None: the default)
    output_format: str
    model: ModelRef | None = None
    job_id: str | None = None
    captioned: bool = field(init=False)

    def __post_init__(self) -> None:
        self.captioned = self.prompt is None


def _validation_error(err: ValidationError) -> RequestError:
    first = err.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or None
    got = first.get("input")
    shown = repr(got) if not isinstance(got, str) or len(got) <= 40 else f"a {len(got)}-character text"
    return RequestError(422, f"{where}: {first['msg']} (got {shown})", where)


def parse_json_body(body: bytes) -> RestoreRequest:
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RequestError(400, f"body: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise RequestError(422, f"body: a JSON object is expected, got {type(data).__name__}")
    try:
        return RestoreRequest.model_validate(data)
    except ValidationError as err:
        raise _validation_error(err) from None


def form_request(fields: dict[str, str]) -> RestoreRequest:
    """A multipart form's text fields as a RestoreRequest (numbers from text; experts as 'soft' or 'name=w,...')."""
    data: dict[str, Any] = dict(fields)
    experts = data.get("experts")
    if isinstance(experts, str) and "=" in experts:
        weights = {}
        for item in experts.split(","):
            name, _, value = item.partition("=")
            try:
                weights[name.strip()] = float(value)
            except ValueError:
                raise RequestError(422, f"experts: {experts!r} is not soft, one_hot or name=weight[,name=weight]", "experts") from None
        data["experts"] = weights
    if "image" in data:
        raise RequestError(422, "image: send the image as a file part, not a text field", "image")
    try:
        return RestoreRequest.model_validate(data)
    except ValidationError as err:
        raise _validation_error(err) from None


def decode_base64(text: str, field_name: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as err:
        raise RequestError(422, f"{field_name}: not valid base64 ({err})", field_name) from None


def decode_upload(data: bytes, field_name: str, limits: LimitsConfig) -> np.ndarray:
    """Image bytes -> H x W x 3 uint8, refusing what is not an image (415), too large (413) or unusable (422)."""
    try:
        image = decode_image(data, max_pixels=limits.max_pixels_in)
    except ImageDecodeError as err:
        status = {"too_large": 413, "not_image": 415, "empty": 422}.get(err.reason, 422)
        raise RequestError(status, f"{field_name}: {err}", field_name) from None
    height, width = image.shape[:2]
    if min(height, width) < limits.min_side:
        raise RequestError(422, f"{field_name}: {width}x{height} is smaller than {limits.min_side} px on a side", field_name)
    return image


def _check_text(value: str | None, name: str, limits: LimitsConfig) -> None:
    if value is not None and len(value) > limits.max_prompt_chars:
        raise RequestError(422, f"{name}: {len(value):,} characters, over the limit of {limits.max_prompt_chars:,}", name)


def check_request(
    request: RestoreRequest, image: np.ndarray, references: list[np.ndarray] | Literal["auto"], config: AppConfig
) -> RestoreCall:
    """The limits of [serve.limits] and the settings `restore` will run with (422 naming the field otherwise)."""
    limits = config.serve.limits
    _check_text(request.prompt, "prompt", limits)
    _check_text(request.restoration_prompt, "restoration_prompt", limits)
    _check_text(request.model, "model", limits)
    bounds = (("steps", limits.max_steps), ("cfg", limits.max_cfg), ("tau_r", limits.max_tau_r))
    bounds += (("control_scale", limits.max_control_scale), ("upscale", limits.max_upscale))
    bounds += (("retrieval_k", limits.max_references),)
    for name, most in bounds:
        value = getattr(request, name)
        if value is not None and value > most:
            raise RequestError(422, f"{name}: {value:g} is over the limit of {most:g}", name)
    if references != "auto" and len(references) > limits.max_references:
        raise RequestError(422, f"references: {len(references)} uploaded, at most {limits.max_references}", "references")
    if references == "auto" and not config.serve.index:
        raise RequestError(422, "references: auto needs a reference index, and this service has none (serve.index)", "references")
    try:
        sampler = with_sampler_preset(config.sampler, request.sampler)
    except InputError as err:
        raise RequestError(422, f"sampler: {err}", "sampler") from None
    for name in ("steps", "cfg", "control_scale"):
        if getattr(request, name) is not None:
            sampler[name] = getattr(request, name)
    if request.tau_r is not None:
        sampler["tau_r"] = request.tau_r if request.tau_r > 0 else None
    if sampler["steps"] > limits.max_steps:
        raise RequestError(422, f"steps: the sampler's {sampler['steps']} steps are over the limit of {limits.max_steps}", "steps")
    options = config.restore.model_dump()
    for name in ("seed", "upscale", "retrieval_k", "min_similarity", "restoration_prompt"):
        if getattr(request, name) is not None:
            options[name] = getattr(request, name)
    height, width = image.shape[:2]
    upscale = options["upscale"]
    if width * upscale * height * upscale > limits.max_pixels_out:
        out = f"{round(width * upscale)}x{round(height * upscale)}"
        raise RequestError(422, f"upscale: the output {out} is over the limit of {limits.max_pixels_out:,} pixels", "upscale")
    try:
        sampler_config = SamplerConfig.model_validate(sampler)
        options_config = RestoreConfig.model_validate(options)
    except ValidationError as err:
        raise _validation_error(err) from None
    return RestoreCall(
        image=image,
        references=references if references == "auto" else [Reference(ref, None, f"upload:{i}") for i, ref in enumerate(references)],
        prompt=request.prompt,
        restoration_prompt=request.restoration_prompt,
        sampler=sampler_config,
        options=options_config,
        expert_weights=request.experts,
        model_name=request.model,
        output_format=request.output_format,
    )


def parse_json(body: bytes, config: AppConfig, model_header: str | None = None) -> RestoreCall:
    """A JSON body (image and references base64) as a checked RestoreCall."""
    request = parse_json_body(body)
    limits = config.serve.limits
    if request.image is None:
        raise RequestError(422, "image: missing (base64 in the JSON body)", "image")
    image = decode_upload(decode_base64(request.image, "image"), "image", limits)
    references: Any = request.references
    if isinstance(references, list):
        references = [
            decode_upload(decode_base64(text, f"references[{i}]"), f"references[{i}]", limits) for i, text in enumerate(references)
        ]
    return _checked(request, image, references, config, model_header)


def parse_form(fields: dict[str, str], files: dict[str, list[bytes]], config: AppConfig, model_header: str | None = None) -> RestoreCall:
    """A multipart form's text fields and file parts (`image`, `reference`) as a checked RestoreCall."""
    limits = config.serve.limits
    if fields.get("references") == "upload":
        fields = {key: value for key, value in fields.items() if key != "references"}
    request = form_request(fields)
    if len(files.get("image", [])) != 1:
        raise RequestError(422, f"image: send exactly one image file part (got {len(files.get('image', []))})", "image")
    image = decode_upload(files["image"][0], "image", limits)
    references: Any = [decode_upload(data, f"reference[{i}]", limits) for i, data in enumerate(files.get("reference", []))]
    if references and request.references != "none":
        raise RequestError(422, "references: uploaded reference files and references=auto exclude each other", "references")
    return _checked(request, image, references or request.references, config, model_header)


def _checked(request: RestoreRequest, image: np.ndarray, references: Any, config: AppConfig, model_header: str | None) -> RestoreCall:
    if references == "none":
        references = []
    if request.model is None and model_header:
        request = request.model_copy(update={"model": model_header})
    return check_request(request, image, references, config)
