"""The real CLIP BPE tokenizer (49,408 tokens), built from the vocabulary open_clip ships.

Why: the embedded model must look like a real Stable Diffusion checkpoint to every loader, and
prompts must tokenise exactly as with SD's own tokenizer ("a photo of a cat" ->
[49406, 320, 1125, 539, 320, 2368, 49407]). No model hub is reachable, but the MIT-licensed
`open_clip_torch` wheel on PyPI carries the same BPE merges (`bpe_simple_vocab_16e6.txt.gz`). We
only *download* that wheel (never install it: it would pull torchvision) and read the file.

The tokenizer folder is written the way SD 1.x checkpoints have it (vocab.json, merges.txt,
tokenizer_config.json, special_tokens_map.json): transformers 5 would write only tokenizer.json,
which older stacks cannot read.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import zipfile
from pathlib import Path

from transformers import CLIPTokenizer

OPEN_CLIP_VERSION = "3.3.0"
BPE_MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"
DEFAULT_CACHE = Path(".cache/open_clip")
BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
MODEL_MAX_LENGTH = 77
VOCAB_SIZE = 49408
N_MERGES = 48894  # lines[1 : 48895] of the BPE file: 49408 - 2 * 256 - 2 special tokens


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode characters: BPE works on
    these characters so that whitespace and control bytes never appear in merges."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def fetch_bpe_file(cache_dir: Path = DEFAULT_CACHE) -> Path:
    """Path of the BPE merges file, downloading the open_clip wheel into cache_dir if needed."""
    target = cache_dir / "bpe_simple_vocab_16e6.txt.gz"
    if target.exists():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    wheels = sorted(cache_dir.glob(f"open_clip_torch-{OPEN_CLIP_VERSION}-*.whl"))
    if not wheels:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
             f"open_clip_torch=={OPEN_CLIP_VERSION}", "-d", str(cache_dir)],
            check=True,
        )
        wheels = sorted(cache_dir.glob(f"open_clip_torch-{OPEN_CLIP_VERSION}-*.whl"))
    with zipfile.ZipFile(wheels[0]) as wheel:
        target.write_bytes(wheel.read(BPE_MEMBER))
    return target


def vocab_and_merges(bpe_file: Path) -> tuple[dict[str, int], list[str]]:
    """CLIP's vocabulary and merges, in CLIP's own order (token ids must match real SD)."""
    lines = gzip.decompress(bpe_file.read_bytes()).decode("utf-8").split("\n")
    merges = lines[1 : N_MERGES + 1]
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars]
    tokens += ["".join(merge.split()) for merge in merges]
    tokens += [BOS, EOS]
    if len(tokens) != VOCAB_SIZE:
        raise ValueError(f"expected {VOCAB_SIZE} tokens, built {len(tokens)}")
    return {token: i for i, token in enumerate(tokens)}, merges


def write_tokenizer_folder(folder: Path, vocab: dict[str, int], merges: list[str]) -> None:
    """Write the four files of an SD 1.x `tokenizer/` folder."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8"
    )
    special = {"content": "", "lstrip": False, "normalized": True, "rstrip": False,
               "single_word": False}
    config = {
        "add_prefix_space": False,
        "bos_token": {**special, "content": BOS},
        "do_lower_case": True,
        "eos_token": {**special, "content": EOS},
        "errors": "replace",
        "model_max_length": MODEL_MAX_LENGTH,
        "pad_token": EOS,
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": {**special, "content": EOS},
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    special_map = {
        "bos_token": {**special, "content": BOS},
        "eos_token": {**special, "content": EOS},
        "pad_token": EOS,
        "unk_token": {**special, "content": EOS},
    }
    (folder / "special_tokens_map.json").write_text(
        json.dumps(special_map, indent=2), encoding="utf-8"
    )


def build_tokenizer(folder: Path, cache_dir: Path = DEFAULT_CACHE) -> CLIPTokenizer:
    """Write an SD-style tokenizer folder and load it back (the round trip is the check)."""
    vocab, merges = vocab_and_merges(fetch_bpe_file(cache_dir))
    write_tokenizer_folder(folder, vocab, merges)
    return CLIPTokenizer.from_pretrained(str(folder), model_max_length=MODEL_MAX_LENGTH)
