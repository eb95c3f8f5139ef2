"""`remat serve`: its flags (each also a REMAT_* environment variable, for containers
and ConfigMaps) and the ServerConfig they build. The SDK's `remat` command hands
`remat serve ...` to `main` here, so the server's flags live with the server.

    >>> args = build_parser({"REMAT_MAX_NODES": "5000"}).parse_args(["--port", "0"])
    >>> config = server_config(args)
    >>> config.port, config.limits.max_nodes
    (0, 5000)
"""

from __future__ import annotations

import argparse
import os
import sys

from remat_proto.arguments import non_negative_int, non_negative_seconds, positive

from ..graph.limits import Limits
from ..runtime.allocator import MAX_MMAP_THRESHOLD_BYTES
from .auth import with_security
from .config import AUTO, ServerConfig


def main(argv: list[str] | None = None, environ=None) -> int:
    """`remat serve [flags]`: run a server until SIGTERM or SIGINT."""
    return _serve(build_parser(os.environ if environ is None else environ).parse_args(argv))


def _serve(args) -> int:
    from .serve import serve  # the process machinery: only when serving

    try:
        config = server_config(args)
        return serve(
            config,
            workers=args.workers,
            grace=args.grace,
            metrics_port=args.metrics_port,
            metrics_host=args.metrics_host or args.host.strip("[]"),
        )
    except (OSError, ValueError) as error:  # port taken, unreadable token or TLS file
        print(f"remat serve: error: {error}", file=sys.stderr)
        return 1


def server_config(args, environ=None):
    """The ServerConfig that `remat serve` flags and the environment describe: TLS paths
    from flags, else REMAT_TLS_*; tokens from --token-file, else REMAT_AUTH_TOKENS."""
    config = ServerConfig(
        host=args.host,
        port=args.port,
        max_workers=args.threads,
        max_message_bytes=args.max_message_mb << 20,
        stream_chunk_bytes=args.stream_chunk_bytes,
        max_upload_seconds=args.max_upload_seconds,
        max_concurrent_rpcs=args.max_concurrent_rpcs,
        graph_cache_bytes=args.graph_cache_bytes,
        compile_cache_bytes=args.compile_cache_bytes,
        memory_budget_bytes=args.memory_budget_bytes,
        memory_budget_fraction=args.memory_budget_fraction,
        machine_memory_bytes=args.machine_memory_bytes,
        max_queued_requests=args.max_queued_requests,
        max_concurrent_solves=args.max_concurrent_solves,
        buffer_pool_bytes=args.buffer_pool_bytes,
        malloc_mmap_threshold_bytes=args.malloc_mmap_threshold_bytes,
        malloc_trim_threshold_bytes=args.malloc_trim_threshold_bytes,
        malloc_arena_max=args.malloc_arena_max,
        limits=Limits(**{flag: getattr(args, flag) for flag in LIMIT_FLAGS}),
        reuse_port=args.reuse_port or args.workers > 1,
        max_connection_age_seconds=args.max_connection_age_seconds,
        max_connection_age_grace_seconds=args.max_connection_age_grace_seconds,
    )
    return with_security(
        config,
        tls_cert_file=args.tls_cert_file,
        tls_key_file=args.tls_key_file,
        tls_client_ca_file=args.tls_client_ca_file,
        token_file=args.token_file,
        environ=environ,
    )


LIMIT_FLAGS = (
    "max_nodes",
    "max_edges",
    "max_rank",
    "max_dim",
    "max_elements",
    "max_request_bytes",
    "optimal_max_nodes",
    "optimal_time_limit",
)
# --- `remat serve` flags from the environment -----------------------------------------------
ENV_PREFIX = "REMAT_"
# REMAT_TOKEN_FILE is the SDK's own token file: a shell set up as a client must not turn
# authentication on for a server started from it (server tokens: $REMAT_AUTH_TOKENS).
_NOT_FROM_ENV = frozenset({"help", "token_file"})
# The TLS paths keep their variables, which remat_server.auth.with_security reads (the
# same names the rule gives): the flags' defaults stay "" so server_config decides.
_TLS_FLAGS = frozenset({"tls_cert_file", "tls_key_file", "tls_client_ca_file"})
_TRUE, _FALSE = frozenset({"1", "true", "yes"}), frozenset({"0", "false", "no"})


def mmap_threshold(text: str) -> int:
    """Bytes glibc accepts as its mmap threshold (mallopt refuses 0 and over 32 MiB)."""
    value = positive(text)
    if value > MAX_MMAP_THRESHOLD_BYTES:
        raise argparse.ArgumentTypeError(
            f"expected at most {MAX_MMAP_THRESHOLD_BYTES} bytes (glibc's largest), got {text!r}"
        )
    return value


def budget_bytes(text: str) -> int:
    """`--memory-budget-bytes`: "auto" (from the machine) or bytes (0: no budget)."""
    if text.strip().lower() == "auto":
        return AUTO
    return non_negative_int(text)


def fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {text!r}")
    return value


def env_var(dest: str) -> str:
    """The environment variable that sets a `remat serve` flag's default.

    >>> env_var("max_connection_age_seconds")
    'REMAT_MAX_CONNECTION_AGE_SECONDS'
    """
    return ENV_PREFIX + dest.upper()


class _FromEnv(str):
    """A default read from the environment. argparse converts a string default with the
    flag's type, and only when the flag is not given, so an explicit flag wins and a
    bad variable is reported only if it is used, naming the variable."""

    var = ""


def _switch(text: str) -> bool:
    word = text.strip().lower()
    if word in _TRUE or word in _FALSE:
        return word in _TRUE
    raise ValueError(f"expected one of {', '.join(sorted(_TRUE | _FALSE))}")


def _env_typed(convert):
    def parse(text):
        if not isinstance(text, _FromEnv):
            return convert(text)
        try:
            return convert(str(text))
        except (argparse.ArgumentTypeError, TypeError, ValueError) as error:
            raise argparse.ArgumentTypeError(
                f"invalid value ${text.var}={str(text)!r} in the environment: {error}"
            ) from None

    parse.__name__ = getattr(convert, "__name__", "value")  # argparse's "invalid int value"
    return parse


def _defaults_from_env(parser: argparse.ArgumentParser, environ) -> None:
    """REMAT_<FLAG> (`env_var`) becomes the flag's default; empty counts as unset."""
    for action in parser._actions:
        if not action.option_strings or action.dest in _NOT_FROM_ENV | _TLS_FLAGS:
            continue
        text = environ.get(env_var(action.dest), "").strip()
        if not text:
            continue
        switch = action.nargs == 0 and action.const is True  # store_true
        action.type = _env_typed(_switch if switch else (action.type or str))
        action.default = _FromEnv(text)
        action.default.var = env_var(action.dest)


def serve_env_vars() -> dict[str, str]:
    """Every environment variable `remat serve` reads a flag's default from, with the
    flag: what a ConfigMap or compose file may set.

        >>> serve_env_vars()["REMAT_MAX_NODES"], serve_env_vars()["REMAT_THREADS"]
        ('--max-nodes', '--threads')
    """
    serve = build_parser({})
    return {
        env_var(action.dest): action.option_strings[0]
        for action in serve._actions
        if action.option_strings and action.dest not in _NOT_FROM_ENV
    }


def build_parser(environ) -> argparse.ArgumentParser:
    """`remat serve`'s parser; flags default from `environ` (REMAT_<FLAG>)."""
    serve = argparse.ArgumentParser(
        prog="remat serve",
        description="Run a remat server until SIGTERM or SIGINT: then health checks say "
        "NOT_SERVING, new requests are refused, and running ones get --grace seconds "
        "to finish. Secrets never go on the command line: bearer tokens come from "
        "--token-file or $REMAT_AUTH_TOKENS, TLS keys from PEM files. Every flag but "
        "--token-file can also be set in the environment, as REMAT_ and the flag's name "
        "in capitals with - as _ ($REMAT_MAX_NODES for --max-nodes, $REMAT_THREADS for "
        "--threads, $REMAT_REUSE_PORT=1/true/yes or 0/false/no for --reuse-port); a flag "
        "on the command line wins.",
    )
    serve.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1; 0.0.0.0 or [::] for all interfaces)",
    )
    serve.add_argument(
        "--port",
        type=int,
        default=50051,
        help="gRPC port (default 50051; 0 picks a free one, printed)",
    )
    serve.add_argument(
        "--workers",
        type=positive,
        default=1,
        help="server processes sharing the port (SO_REUSEPORT; forked at "
        "start, not restarted; default 1). NumPy work holds the GIL, so "
        "use one per core to use several cores",
    )
    serve.add_argument(
        "--threads",
        "--workers-threads",
        dest="threads",
        type=positive,
        default=8,
        help="executor calls doing work at once per process (default 8); others wait "
        "for one, up to --max-concurrent-rpcs, while health checks and metrics answer at "
        "once (--workers-threads is a deprecated alias)",
    )
    serve.add_argument(
        "--reuse-port",
        action="store_true",
        help="let other processes bind the same port (implied by --workers)",
    )
    serve.add_argument(
        "--grace",
        type=float,
        default=10.0,
        help="on SIGTERM, seconds running requests get to finish before "
        "they are cancelled (default 10)",
    )
    serve.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="serve Prometheus metrics on this port (0: a free one, printed; "
        "default: no metrics endpoint). With --workers, one endpoint "
        "aggregates every worker",
    )
    serve.add_argument(
        "--metrics-host", default=None, help="address of the metrics endpoint (default: --host)"
    )
    serve.add_argument(
        "--max-message-mb",
        type=int,
        default=512,
        help="largest gRPC message in MiB (default 512); bigger tensors use RunStream",
    )
    serve.add_argument(
        "--stream-chunk-bytes",
        type=positive,
        default=1 << 20,
        help="size of each tensor chunk RunStream sends (default 1 MiB)",
    )
    serve.add_argument(
        "--max-upload-seconds",
        type=float,
        default=600.0,
        help="a RunStream upload still unfinished after this long is "
        "cancelled, so a stalled client cannot hold a thread (default 600)",
    )
    serve.add_argument(
        "--max-concurrent-rpcs",
        type=int,
        default=256,
        help="RPCs handled or queued at once per process; beyond it calls "
        "fail with RESOURCE_EXHAUSTED (default 256; 0: no limit)",
    )
    serve.add_argument(
        "--graph-cache-bytes",
        type=int,
        default=256 << 20,
        help="bytes of registered graphs kept per process (default 256 MiB)",
    )
    serve.add_argument(
        "--compile-cache-bytes",
        type=int,
        default=ServerConfig.compile_cache_bytes,
        help="estimated bytes of compiled requests (validated and joint "
        "graphs, plans) kept per process, so a repeated request skips "
        "validation, autodiff and planning (default "
        f"{ServerConfig.compile_cache_bytes >> 20} MiB; 0: none)",
    )
    serve.add_argument(
        "--tls-cert-file",
        default="",
        help="PEM certificate chain: serve TLS (default $REMAT_TLS_CERT_FILE)",
    )
    serve.add_argument(
        "--tls-key-file",
        default="",
        help="PEM private key of --tls-cert-file (default $REMAT_TLS_KEY_FILE)",
    )
    serve.add_argument(
        "--tls-client-ca-file",
        default="",
        help="PEM CA certificates: clients must present a certificate one "
        "signed (mutual TLS; default $REMAT_TLS_CLIENT_CA_FILE)",
    )
    serve.add_argument(
        "--token-file",
        default="",
        help="file of bearer tokens, one a line, any of which authenticates a "
        "call (default: tokens from $REMAT_AUTH_TOKENS, comma- or space-"
        "separated; neither: no authentication). There is no flag taking a "
        "token itself: command lines are visible to `ps`",
    )
    defaults = Limits()
    for flag in LIMIT_FLAGS:
        value = getattr(defaults, flag)
        serve.add_argument(
            "--" + flag.replace("_", "-"),
            type=type(value),
            default=value,
            help=f"per-request limit (default {value})",
        )
    serve.add_argument(
        "--memory-budget-bytes",
        type=budget_bytes,
        default=AUTO,
        help="predicted peak bytes of all running requests together; requests over it "
        "queue or are rejected. Default auto: --memory-budget-fraction of the memory "
        "this process may use (its cgroup limit, else the physical memory; "
        "--machine-memory-bytes overrides), shared among --workers, less the graph and "
        "compile caches and the buffer pool; printed at start. 0: no shared budget",
    )
    serve.add_argument(
        "--memory-budget-fraction",
        type=fraction,
        default=ServerConfig.memory_budget_fraction,
        help="share of the machine's memory the auto budget gives running requests "
        f"(default {ServerConfig.memory_budget_fraction}); the rest is for the "
        "interpreter, messages in flight and allocator slack",
    )
    serve.add_argument(
        "--machine-memory-bytes",
        type=non_negative_int,
        default=0,
        help="the memory this process may use, for the auto budget (default 0: read "
        "from the cgroup, else the physical memory)",
    )
    serve.add_argument(
        "--max-queued-requests",
        type=int,
        default=64,
        help="requests that may wait for memory, or for a solve slot, at once (default 64)",
    )
    serve.add_argument(
        "--max-concurrent-solves",
        type=positive,
        default=ServerConfig.max_concurrent_solves,
        help="exact solves (policy optimal) and budget searches planning at once per "
        f"process (default {ServerConfig.max_concurrent_solves}); others wait, until "
        "their deadline, in a queue of at most --max-queued-requests",
    )
    serve.add_argument(
        "--buffer-pool-bytes",
        type=int,
        default=ServerConfig.buffer_pool_bytes,
        help="idle RunStream upload buffers kept per process for reuse, so "
        "big uploads skip the page faults of fresh memory (default "
        f"{ServerConfig.buffer_pool_bytes >> 20} MiB; 0: none)",
    )
    serve.add_argument(
        "--malloc-mmap-threshold-bytes",
        type=mmap_threshold,
        default=ServerConfig.malloc_mmap_threshold_bytes,
        help="glibc gives buffers over this their own mapping, returned to the OS when "
        "freed (default 4 MiB: the RSS stays flat under a mixed load; at most 32 MiB: "
        "with --malloc-trim-threshold-bytes 67108864 freed buffers are reused, so big "
        "training steps run up to 1.4x faster, but a mixed load's RSS grows 10-20%%)",
    )
    serve.add_argument(
        "--malloc-trim-threshold-bytes",
        type=non_negative_int,
        default=ServerConfig.malloc_trim_threshold_bytes,
        help="glibc returns a heap's free top to the OS beyond this (default 4 MiB)",
    )
    serve.add_argument(
        "--malloc-arena-max",
        type=non_negative_int,
        default=ServerConfig.malloc_arena_max,
        help="glibc arenas the server's threads share (default "
        f"{ServerConfig.malloc_arena_max}: the least memory kept in fragments; 0: glibc's "
        "default of 8 per core)",
    )
    serve.add_argument(
        "--max-connection-age-seconds",
        type=non_negative_seconds,
        default=0.0,
        help="close each client connection after about this long (gRPC "
        "GOAWAY, +-10%%), so clients reconnect, re-resolve DNS and reach new "
        "replicas (default 0: never)",
    )
    serve.add_argument(
        "--max-connection-age-grace-seconds",
        type=non_negative_seconds,
        default=30.0,
        help="calls still running on a connection closed by "
        "--max-connection-age-seconds get this long to finish (default 30; "
        "0: no limit)",
    )
    _defaults_from_env(serve, environ)
    return serve
