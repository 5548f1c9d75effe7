"""The project's embedded default model: a tiny Stable Diffusion trained here on generated shapes.

No model hub is reachable from the project's machines, and a random pipeline only makes noise,
so this package generates a captioned shapes dataset, trains an SD-format pipeline on it on CPU,
and writes it to models/tiny-shapes-sd. Entry point: `python -m embedded_model --help`.
"""
