"""`remat health`: one gRPC health check, for a container's HEALTHCHECK.

remat health --target 127.0.0.1:50051    # exit 0 if SERVING, else 1 and the reason
"""

from __future__ import annotations

import sys

from remat_proto.arguments import positive_seconds


def _health(args) -> int:
    """One grpc.health.v1 Check: exit 0 if SERVING, else 1 with the reason on stderr."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from .credentials import TLS, make_channel

    def fail(reason: str) -> int:
        print(f"remat health: {args.target}: {reason}", file=sys.stderr)
        return 1

    try:
        tls = None
        if args.tls or args.tls_ca_file or args.tls_cert_file or args.tls_key_file:
            tls = TLS(
                root_certificates_file=args.tls_ca_file,
                certificate_file=args.tls_cert_file,
                private_key_file=args.tls_key_file,
                server_name_override=args.tls_server_name or None,
            )
        # token=None: $REMAT_TOKEN or $REMAT_TOKEN_FILE, like the SDK (health needs none,
        # but a proxy in front of the server may).
        with make_channel(args.target, tls=tls) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
    except grpc.RpcError as error:
        details = error.details() or (
            f"no health status for service {args.service!r}"
            if error.code() == grpc.StatusCode.NOT_FOUND
            else ""
        )
        return fail(f"{error.code().name}: {details}" if details else error.code().name)
    except ValueError as error:  # unreadable TLS file or token file, bad TLS settings
        return fail(str(error))
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        return fail(status)
    print(status)
    return 0


def register(sub) -> None:
    health = sub.add_parser(
        "health",
        help="check a server's gRPC health (exit 0 if SERVING)",
        description="Call grpc.health.v1.Health/Check once: exit 0 if the server answers "
        "SERVING, else 1 with the status or the error on stderr (a container "
        "HEALTHCHECK). A bearer token, if needed, comes from $REMAT_TOKEN or "
        "$REMAT_TOKEN_FILE; the remat server answers health checks without one.",
    )
    health.add_argument(
        "--target", default="localhost:50051", help="server address (default localhost:50051)"
    )
    health.add_argument(
        "--service",
        default="",
        help='service to ask about (default "": the whole server; or "remat.v1.Executor")',
    )
    health.add_argument(
        "--timeout",
        type=positive_seconds,
        default=3.0,
        help="seconds to wait for the answer (default 3)",
    )
    health.add_argument(
        "--tls",
        action="store_true",
        help="connect with TLS, trusting the system's root certificates",
    )
    health.add_argument(
        "--tls-ca-file", default="", help="connect with TLS, trusting these PEM CA certificates"
    )
    health.add_argument(
        "--tls-cert-file",
        default="",
        help="PEM client certificate, for servers that require one (mutual TLS)",
    )
    health.add_argument("--tls-key-file", default="", help="PEM private key of --tls-cert-file")
    health.add_argument(
        "--tls-server-name",
        default="",
        help="check the server's certificate against this name instead of the target's host",
    )
    health.set_defaults(run=_health)
