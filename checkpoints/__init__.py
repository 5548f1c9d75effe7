"""Single-file Stable Diffusion checkpoints: the original (CompVis/Stability "LDM") layout.

- `architectures`: the published SD 1.5 / 2.1(-base) / SDXL-base configs, shipped (no hub).
- `keymap`: where every diffusers tensor lives in the original file (both directions).
- `spec`: the diffusers configs a file becomes (from its metadata or a shipped architecture).
- `detect`: open a file (header only), refuse what the morph cannot serve, pick the architecture.
- `components`: the folder's parts as meta-device skeletons and as files on disk.
- `convert`: single file -> diffusers folder (`python -m checkpoints.convert`; the export uses it).
- `write_single_file`: diffusers folder -> single file (`python -m checkpoints.write_single_file`).
"""
