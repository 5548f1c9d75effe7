"""Packaging the morph service for TorchServe: `python -m export` writes model_store/<name>.mar."""
