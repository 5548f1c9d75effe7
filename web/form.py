"""The page's morph form (multipart: `image` files in morph order, one `prompt` each, `options`
JSON; or one `image` and several `prompt`s, the service making the other endpoints), checked
against the service's limits before anything is sent on.

Only what protects this process is checked here (the upload's size, the image count, that the
options are a JSON object). Whether a file is an image and whether an option is valid is the
service's decision, and the page shows the service's answer in its words.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from starlette.datastructures import UploadFile
from starlette.requests import Request

from morph_protocol import limits as service_limits

from .limits import FORMATS, PageLimits

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
    form = await request.form(max_files=limits.max_images + 1, max_fields=limits.max_one_image_prompts + 8,
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
    finally:
        await form.close()
    total = sum(len(image) for image in images)
    if total > limits.max_request_bytes:
        raise FormError(413, f"the images are {total} bytes together; this service takes at most "
                             f"{limits.max_request_bytes} bytes per morph")
    return MorphForm(images, prompts, parse_options(str(raw_options)))


def parse_options(text: str) -> dict[str, Any]:
    """The form's options as the request's `options`, asking for every encoding the page shows."""
    try:
        options = json.loads(text)
    except json.JSONDecodeError as error:
        raise FormError(400, f"options are not JSON: {error}") from error
    if not isinstance(options, dict):
        raise FormError(400, "options must be a JSON object")
    return {**options, "format": list(FORMATS)}
