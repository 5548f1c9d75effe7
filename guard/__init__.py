"""The guard: what keeps a TorchServe 0.12 morph server serving (gRPC gateway, watchdog, tokens).

Standard library and grpcio only (no torch). What it shares with the worker (the control
directory, OIP names, limits) is `morph_protocol`; it imports neither the worker nor the client.
"""
