"""The guard: what keeps a TorchServe 0.12 morph server serving (gRPC gateway, watchdog, tokens).

Standard library and grpcio only (no torch); `guard.control` is also shipped inside the model
archive, where the handler uses it.
"""
