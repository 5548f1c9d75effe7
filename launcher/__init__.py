"""Starts a real TorchServe (and its guard) on free loopback ports: for the tests, the load test
and the soak. Tooling: the product never imports it."""
