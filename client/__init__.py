"""gRPC client library and CLI for the morph service served by TorchServe.

Needs only grpcio, protobuf, Pillow and tqdm; it never imports torch, diffusers or the morph core.
The message format it reads is `morph_protocol.wire`, shared with the server's handler; the gRPC
stubs come from `grpc_api`. Import `client.morph_client.MorphClient` for the gRPC API,
`client.rest.RestClient` for TorchServe's REST predictions endpoint (standard library only).
"""
