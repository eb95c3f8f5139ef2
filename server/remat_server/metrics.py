"""PLACEHOLDER being replaced by the metrics work (issue 5); interface only."""
from __future__ import annotations

import grpc


class _Pass(grpc.ServerInterceptor):
    def intercept_service(self, continuation, handler_call_details):
        return continuation(handler_call_details)


class ServerMetrics:
    def interceptor(self) -> grpc.ServerInterceptor:
        return _Pass()

    def track_cache(self, store) -> None:
        pass

    def observe_run(self, metrics) -> None:
        pass
