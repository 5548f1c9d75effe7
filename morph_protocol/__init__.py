"""The morph service's protocol: what its processes share, and nothing else.

The worker (handler), the guard, the client, the web page and the load test each import this
package; it imports nothing of the project and only the standard library, so it also travels
inside the model archive. Modules: `wire` (message framing and request field names), `limits`
(every size and count limit), `errors` (typed error codes), `control` (the control directory's
layout), `properties` (TorchServe's config.properties), `keyfile` (TorchServe's key file), `management` (its management API and the wait for a
READY worker),
`oip` (Open Inference Protocol names), `torchserve` (TorchServe's own message texts),
`formats` (the output formats: names, MIME types, file suffixes).
"""
