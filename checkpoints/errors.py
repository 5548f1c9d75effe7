"""The one error of the package: a file that cannot become a supported diffusers folder."""


class CheckpointError(ValueError):
    """A single-file checkpoint that is missing, unsafe to load, or not a supported model; the
    message names what was found and what is supported (the export shows it as is)."""
