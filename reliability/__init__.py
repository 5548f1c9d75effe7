"""Reliability tooling for the morph service: a generated corpus of hostile and edge-case requests."""
