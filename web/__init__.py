"""The morph web page (`python -m web`, `make web`): a browser front end for the running service.

A client of the service over gRPC (client.MorphClient), never a second copy of the model: this
package imports neither torch nor the morph core (tests/test_web.py checks it in a fresh
interpreter). See docs/web.md.
"""
