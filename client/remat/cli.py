"""The `remat` command: serve, demo, ops.

    remat serve --host 0.0.0.0 --port 50051
    remat demo
    remat ops
"""
from __future__ import annotations

import argparse
import signal
import sys
import threading

import numpy as np


def _serve(args) -> int:
    from remat_server import Limits, ServerConfig, create_server

    config = ServerConfig(
        host=args.host, port=args.port, max_workers=args.workers_threads,
        max_message_bytes=args.max_message_mb << 20,
        limits=Limits(max_nodes=args.max_nodes, max_rank=args.max_rank, max_dim=args.max_dim,
                      max_elements=args.max_elements, max_request_bytes=args.max_request_bytes))
    server, port = create_server(config)
    server.start()
    print(f"remat server listening on {args.host}:{port}", flush=True)
    stopped = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopped.set())
    stopped.wait()
    server.stop(grace=args.grace).wait()
    return 0


def _demo(args) -> int:
    import remat

    model = remat.models.mlp(batch=args.batch)
    print(f"remat demo: {model.graph.name} with {len(model.graph.nodes)} nodes, "
          f"batch {args.batch}, in-process server")
    with remat.Client.in_process() as client:
        result = client.run(model.graph, model.inputs, wrt=model.wrt, loss=model.loss)
    print(f"loss = {float(result.outputs['loss']):.6f}")
    print("gradient norms:")
    for name in model.wrt:
        print(f"  {name:<4} {float(np.linalg.norm(result.grads[name])):.6f}")
    m = result.metrics
    print("metrics (policy store_all):")
    print(f"  peak bytes     {m.peak_bytes:>12,}  (predicted {m.predicted_peak_bytes:,})")
    print(f"  forward        {m.forward_seconds * 1e3:>9.2f} ms")
    print(f"  backward       {m.backward_seconds * 1e3:>9.2f} ms")
    print(f"  total          {m.total_seconds * 1e3:>9.2f} ms")
    print(f"  nodes computed {m.nodes_computed:>9}   flops {m.flops:,}")
    return 0


def _ops(args) -> int:
    import remat

    with (remat.Client(args.target) if args.target else remat.Client.in_process()) as client:
        ops = client.list_ops()
    for family in sorted({op.family for op in ops}):
        print(f"{family}:")
        for op in (o for o in ops if o.family == family):
            arity = f"{op.min_inputs}+" if op.max_inputs < 0 else str(op.max_inputs)
            attrs = ", ".join(a.name + ("" if a.required else "?") for a in op.attrs)
            grad = "differentiable" if any(op.differentiable) else "no gradient"
            print(f"  {op.name:<24} inputs {arity:<3} {grad:<15} {attrs}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from remat_server.limits import Limits

    parser = argparse.ArgumentParser(prog="remat", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run a remat server")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=50051)
    serve.add_argument("--workers-threads", type=int, default=8, help="RPC handler threads")
    serve.add_argument("--max-message-mb", type=int, default=512)
    serve.add_argument("--grace", type=float, default=10.0, help="seconds to finish on SIGTERM")
    defaults = Limits()
    for flag in ("max_nodes", "max_rank", "max_dim", "max_elements", "max_request_bytes"):
        serve.add_argument("--" + flag.replace("_", "-"), type=int, default=getattr(defaults, flag))
    serve.set_defaults(run=_serve)

    demo = sub.add_parser("demo", help="run a sample MLP on an in-process server")
    demo.add_argument("--batch", type=int, default=64)
    demo.set_defaults(run=_demo)

    ops = sub.add_parser("ops", help="list the server's ops")
    ops.add_argument("--target", help="server address (default: an in-process server)")
    ops.set_defaults(run=_ops)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
