"""TorchServe's management API as the guard uses it: morph_protocol.management's, shared with
the client's `wait --model-ready` and the test launcher."""

from morph_protocol.management import ManagementApi, ManagementError

__all__ = ["ManagementApi", "ManagementError"]
