"""PLACEHOLDER being replaced by the security work (issue 5); interface only."""
from __future__ import annotations

import grpc


class TokenInterceptor(grpc.ServerInterceptor):
    def __init__(self, tokens):
        raise NotImplementedError("bearer tokens are not implemented yet")


def server_credentials(config):
    if config.tls:
        raise NotImplementedError("TLS is not implemented yet")
    return None
