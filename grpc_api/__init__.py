"""TorchServe's gRPC APIs: the protos (TorchServe's inference API and the Open Inference Protocol)
and their Python stubs, shared by the guard (which serves and calls them) and the client. grpcio
and protobuf only; no torch."""
