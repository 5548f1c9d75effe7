"""gRPC client library and CLI for the morph service served by TorchServe.

Needs only grpcio, protobuf, Pillow and tqdm (`pip install -r client/requirements.txt`); it never
imports torch, diffusers or the morph core. `client.wire` (standard library only) is the message
format shared with the server's handler. Import `client.morph_client.MorphClient` for the API.
"""
