"""Capacity tests of the morph service: Locust users (gRPC unary/stream, REST), a step load
shape, TorchServe metrics scraping and a capacity report. Entry point: `python -m loadtest.run`
(`make loadtest`)."""
