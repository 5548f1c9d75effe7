"""Every limit of the service, defined once.

The worker's request parser, the core's option checks, the guard's gateway, the client, the web
page, the hostile-input corpus and the load test read these names; config.properties,
model-config.yaml and the Kubernetes ConfigMap are checked against them (tests/test_limits.py).
Changing a limit here changes it everywhere; a config file that disagrees fails the tests.
"""

from __future__ import annotations

MiB = 1024 * 1024
GiB = 1024 * MiB

# ---------------------------------------------------------------------------- a request
MIN_IMAGES = 2
MAX_IMAGES = 8
# One image and K >= 2 prompts: the service makes the K - 1 other endpoints (diffmorpher.endpoints).
MIN_ONE_IMAGE_PROMPTS = 2
MAX_ONE_IMAGE_PROMPTS = MAX_IMAGES
MAX_IMAGE_PIXELS = 4096 * 4096  # 16 Mpixel per decoded image
MAX_PROMPT_CHARS = 2000
MAX_PROMPT_BYTES = 4 * MAX_PROMPT_CHARS  # UTF-8: at most 4 bytes a character
MAX_OPTIONS_BYTES = 64 * 1024  # a flat JSON object of ~20 options needs well under 1 KiB
# TorchServe's max_request_size / max_response_size (config.properties, the ConfigMap); the
# gateway and the handler refuse what the frontend would.
MAX_REQUEST_BYTES = 100 * MiB
MAX_RESPONSE_BYTES = 256 * MiB
RESPONSE_FRAMING_BYTES = 1 * MiB  # a gRPC response's envelope beyond its payload

# ---------------------------------------------------------------------------- a morph's options
MAX_FRAMES = 256
MAX_LORA_STEPS = 2000
MAX_INFERENCE_STEPS = 1000
MAX_LORA_RANK = 256
# A LoRA sent instead of fitted (wire.lora_key): SD 1.5's attention projections at rank 16 in
# fp32 are 12.8 MB, SD 2.1's 13.0 MB; 64 MiB takes rank 64 of either (about 52 MB) and keeps
# two of them well inside MAX_REQUEST_BYTES.
MAX_LORA_BYTES = 64 * MiB
MAX_FRAME_BATCH = 64  # 0 asks for the worker's choice (diffmorpher.batching.frame_batch_size)
MAX_VAE_BATCH = 64
MAX_RESOLUTION = 2048
# Classifier-free guidance of a generated endpoint (MorphConfig.endpoint_guidance): past ~20
# Stable Diffusion saturates colours; 30 leaves room and refuses nonsense.
MAX_ENDPOINT_GUIDANCE = 30.0

# Lossy WebP's quality (libwebp's 0-100 scale: 0 smallest, 100 best); `webp_quality`.
MIN_WEBP_QUALITY = 0
MAX_WEBP_QUALITY = 100

# ---------------------------------------------------------------------------- the worker
PROGRESS_INTERVAL_S = 0.5  # least seconds between two progress messages of one stage
CACHE_MAX_BYTES = 10 * GiB  # the disk tier of the LoRA/latent cache
CACHE_REDIS_MAX_ENTRY_BYTES = 512 * MiB  # larger entries stay in the disk tier
