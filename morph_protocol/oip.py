"""Open Inference Protocol (KServe v2) names shared by the gateway and the handler.

The gateway (guard/oip.py) turns a KServe v2 ModelInfer call into TorchServe's JSON body with
one extra input tensor of its own, GATEWAY_INPUT; the handler (handler/oip.py) reads it. These
tensor and parameter names are the contract between the two processes. Standard library only.
"""

from __future__ import annotations

BYTES = "BYTES"
# The model's tensors (ModelMetadata reports them; handler/oip.py reads and writes them).
INPUT_IMAGES = "images"  # BYTES [K]: encoded images, or b"ref:<image_key>" for a cached one
INPUT_PROMPTS = "prompts"  # BYTES [K]: UTF-8, one per image
OUTPUT_FRAMES = "frames"  # BYTES [N]: the native result's parts (a GIF, an MP4, PNG frames, ...)
OUTPUT_METADATA = "metadata"  # BYTES [1]: the native result's header (UTF-8 JSON)
IMAGE_REF_PREFIX = b"ref:"
# The gateway's own input tensor and the keys of its JSON object.
GATEWAY_INPUT = "diffmorpher.gateway"
KEY_PARAMETERS = "parameters"  # the request's parameters (+ deadline, call_id), name -> JSON value
KEY_OUTPUTS = "outputs"  # names of the requested outputs; empty: every output
PARAM_DEADLINE = "deadline"  # as the native field: Unix time in seconds
PARAM_CALL_ID = "call_id"  # set by the gateway only
