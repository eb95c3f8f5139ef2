"""gRPC metadata keys the SDK and the server agree on."""

from __future__ import annotations

# Trailing metadata on a Run whose results would not fit in one message: the SDK then
# resends the request over RunStream.
USE_STREAM = "remat-use-stream"
# Initial metadata on a RunStream whose header the server accepted: the SDK sends its
# chunks only then. A refused call's initial metadata arrives empty, with its status
# (a trailers-only response), and writing into it would lose that status (grpc/grpc#36066).
ACCEPTED = "remat-accepted"
# Bearer tokens: ("authorization", "Bearer <token>"), as HTTP has it.
AUTHORIZATION = "authorization"
BEARER = "Bearer "
