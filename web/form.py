"""The page's morph form (multipart: `image` files in morph order, one `prompt` each, `options`
JSON; or one `image` and several `prompt`s, the service making the other endpoints), checked
against the service's limits before anything is sent on.

Only what protects this process is checked here (the upload's size, the image count, that the
options are a JSON object). Whether a file is an image and whether an option is valid is the
service's decision, and the page shows the service's answer in its words.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from starlette.datastructures import UploadFile
from starlette.requests import Request

from morph_protocol import limits as service_limits
from morph_protocol import wire

from .limits import CHOSEN_FORMATS, FORMATS, PageLimits

# Multipart framing, prompts and options on top of the images themselves.
FORM_OVERHEAD_BYTES = 256 * 1024


class FormError(ValueError):
    """A form the page refuses itself; `status` is the HTTP status of the answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class MorphForm:
    images: list[bytes]
    prompts: list[str]
    options: dict[str, Any]
    # Per endpoint (each image; with one image, each prompt), a LoRA file to use instead of fitting
    # one (form field `lora_<i>`), or None.
    loras: list[bytes | None] = field(default_factory=list)


def check_length(request: Request, limits: PageLimits) -> None:
    """Refuse an upload larger than the service takes before reading it."""
    length = request.headers.get("content-length")
    if length is None or not length.isdigit():
        raise FormError(411, "the upload must say its length (Content-Length)")
    if int(length) > limits.max_request_bytes + FORM_OVERHEAD_BYTES:
        raise FormError(413, f"the upload is {int(length)} bytes; this service takes at most "
                             f"{limits.max_request_bytes} bytes of images per morph")


async def read_form(request: Request, limits: PageLimits) -> MorphForm:
    check_length(request, limits)
    endpoints = max(limits.max_images, limits.max_one_image_prompts)  # a prompt and maybe a LoRA each
    form = await request.form(max_files=limits.max_images + endpoints + 1, max_fields=endpoints + 8,
                              max_part_size=service_limits.MAX_OPTIONS_BYTES)
    try:
        uploads = form.getlist("image")
        prompts = [str(prompt) for prompt in form.getlist("prompt")]
        raw_options = form.get("options") or "{}"
        if not all(isinstance(upload, UploadFile) for upload in uploads):
            raise FormError(400, "every `image` field must be a file")
        one_image = len(uploads) == 1 and len(prompts) >= limits.min_one_image_prompts
        if one_image and len(prompts) > limits.max_one_image_prompts:
            raise FormError(400, f"one image takes {limits.min_one_image_prompts} to "
                                 f"{limits.max_one_image_prompts} prompts, got {len(prompts)}")
        if not one_image and not limits.min_images <= len(uploads) <= limits.max_images:
            raise FormError(400, f"a morph takes {limits.min_images} to {limits.max_images} images, "
                                 f"got {len(uploads)}")
        if not one_image and len(prompts) != len(uploads):
            raise FormError(400, f"one prompt per image: {len(uploads)} images, {len(prompts)} prompts")
        images = [await upload.read() for upload in uploads]  # type: ignore[union-attr]
        loras = await read_loras(form, len(prompts) if one_image else len(uploads))  # one per endpoint
    finally:
        await form.close()
    total = sum(len(image) for image in images) + sum(len(lora) for lora in loras if lora)
    if total > limits.max_request_bytes:
        raise FormError(413, f"the images are {total} bytes together; this service takes at most "
                             f"{limits.max_request_bytes} bytes per morph")
    return MorphForm(images, prompts, parse_options(str(raw_options)), loras)


async def read_loras(form: Any, count: int) -> list[bytes | None]:
    """The optional LoRA file of each image (`lora_<i>`, a file a result offered for download;
    with one image and K prompts, of each prompt's endpoint, made ones too):
    at most service_limits.MAX_LORA_BYTES each; what it holds is the service's to check."""
    names = {str(name) for name in form.keys() if str(name).startswith("lora_")}
    expected = {wire.lora_key(index) for index in range(count)}
    if names - expected:
        raise FormError(400, f"LoRA fields {sorted(names - expected)} name no image; there are {count} images")
    loras: list[bytes | None] = []
    for index in range(count):
        upload = form.get(wire.lora_key(index))
        if upload is None:
            loras.append(None)
            continue
        if not isinstance(upload, UploadFile):
            raise FormError(400, f"`{wire.lora_key(index)}` must be a file")
        if upload.size is not None and upload.size > service_limits.MAX_LORA_BYTES:
            raise FormError(413, f"the LoRA of image {index + 1} is {upload.size} bytes; at most "
                                 f"{service_limits.MAX_LORA_BYTES}")
        data = await upload.read()
        if not data or len(data) > service_limits.MAX_LORA_BYTES:
            raise FormError(413 if data else 400, f"the LoRA of image {index + 1} is {len(data)} bytes; a LoRA "
                                                  f"file has 1 to {service_limits.MAX_LORA_BYTES}")
        loras.append(data)
    return loras


def parse_options(text: str) -> dict[str, Any]:
    """The form's options as the request's `options`, asking for every encoding the page shows
    plus those the person chose (the form's `format`: a list of CHOSEN_FORMATS, e.g. ["webp"])."""
    try:
        options = json.loads(text)
    except json.JSONDecodeError as error:
        raise FormError(400, f"options are not JSON: {error}") from error
    if not isinstance(options, dict):
        raise FormError(400, "options must be a JSON object")
    chosen = options.get("format", [])
    if not isinstance(chosen, list) or not all(name in CHOSEN_FORMATS for name in chosen):
        raise FormError(400, f"format must be a list of the formats the page adds ({CHOSEN_FORMATS}), "
                             f"got {json.dumps(chosen)[:60]}")
    return {**options, "format": list(FORMATS) + [name for name in CHOSEN_FORMATS if name in chosen]}
