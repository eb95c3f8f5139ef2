"""gRPC metadata keys the SDK and the server agree on."""

from __future__ import annotations

# Trailing metadata on a Run whose results would not fit in one message: the SDK then
# resends the request over RunStream.
USE_STREAM = "remat-use-stream"
# Bearer tokens: ("authorization", "Bearer <token>"), as HTTP has it.
AUTHORIZATION = "authorization"
BEARER = "Bearer "
