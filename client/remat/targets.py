"""Where a client connects: one address, a gRPC target URI, or several replicas.

A client's channel balances its calls round robin over the addresses its target
resolves to, so `Client("dns:///remat-headless:50051")` (a Kubernetes headless
Service: one address per pod) and `Client(["10.0.0.1:50051", "10.0.0.2:50051"])` spread
concurrent calls over every replica, and a call retried after its replica went away
goes to one that is up. gRPC re-resolves a `dns:///` name when a connection drops, so
pods that come and go are picked up; a list of addresses is resolved once, here.

Round robin spreads load, not a given set of calls: its picker uses only the
connections that are up at that moment and starts at a random one, so the N shards of
a sharded run (`Client.run(..., shards=N)`) could pile onto fewer replicas. So where
the SDK knows the replicas' addresses (a list of addresses, a comma-separated string
of them, or an `ipv4:`/`ipv6:` target; see `replica_targets`), it places the shards
itself: shard i of a run goes to replica (i + offset) mod R, R being the number of
addresses, over a channel to that address alone (opened on first use, with the
client's credentials and options, closed with the client). The offset starts at 0 and
moves on by N after each sharded run, so runs of fewer shards than replicas take
turns. A shard whose replica fails with UNAVAILABLE (it died, or is going) is retried
on the next replica. Behind a `dns:///` name the SDK does not know the addresses (gRPC
resolves them, and they change), so there shards go round robin like every other call:
spread in the long run, but not guaranteed one replica each.
"""

from __future__ import annotations

import ipaddress
import json
import socket
from collections.abc import Iterable, Sequence

# gRPC's default policy, pick_first, would send every call to the first address.
ROUND_ROBIN = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})
_BALANCING_OPTIONS = ("grpc.service_config", "grpc.lb_policy_name")


def channel_target(target: str | Sequence[str]) -> str:
    """The gRPC target for `target`: a string is used as it is (an address or a URI
    such as `dns:///host:port`, `ipv4:a:p,b:p`), unless it is a comma-separated list of
    plain addresses; a list of `host:port` addresses becomes one `ipv4:`/`ipv6:` target
    of all their addresses, which a round-robin channel balances over.

        >>> channel_target("localhost:50051")
        'localhost:50051'
        >>> channel_target(["127.0.0.1:50051", "127.0.0.2:50052"])
        'ipv4:127.0.0.1:50051,127.0.0.2:50052'
        >>> channel_target("[::1]:1,[::1]:2")
        'ipv6:[::1]:1,[::1]:2'
    """
    if isinstance(target, str):
        if ":///" in target or target.startswith(("ipv4:", "ipv6:", "unix:")) or "," not in target:
            return target
        target = target.split(",")
    addresses = [address.strip() for address in target]
    if not addresses or not all(addresses):
        raise ValueError(f"expected one or more 'host:port' addresses, got {target!r}")
    resolved = [ip for address in addresses for ip in _resolve(address)]
    families = {ip.version for ip, _ in resolved}
    if len(families) > 1:  # gRPC has no target scheme that mixes the two
        resolved = [(ip, port) for ip, port in resolved if ip.version == 4]
    scheme = f"ipv{resolved[0][0].version}"
    unique = dict.fromkeys(_format(ip, port) for ip, port in resolved)
    return f"{scheme}:{','.join(unique)}"


def replica_targets(target: str) -> tuple[str, ...]:
    """One gRPC target per replica of `target` (a `channel_target`) when the SDK knows
    its addresses: an `ipv4:` or `ipv6:` target of several, which is what a list of
    addresses becomes. Empty for one address, or a name gRPC resolves (`dns:///...`):
    there calls, shards included, are placed by the round-robin channel alone.

        >>> replica_targets("ipv4:10.0.0.1:1,10.0.0.2:1")
        ('ipv4:10.0.0.1:1', 'ipv4:10.0.0.2:1')
        >>> replica_targets("dns:///remat-headless:50051"), replica_targets("10.0.0.1:1")
        ((), ())
    """
    scheme, _, addresses = target.partition(":")
    if scheme not in ("ipv4", "ipv6") or addresses.startswith("/") or "," not in addresses:
        return ()
    unique = dict.fromkeys(address.strip() for address in addresses.split(","))
    replicas = tuple(f"{scheme}:{address}" for address in unique if address)
    return replicas if len(replicas) > 1 else ()


def balancing_options(options: Iterable[tuple[str, object]]) -> list[tuple[str, object]]:
    """Round-robin load balancing, unless the caller's channel options choose a policy."""
    if any(name in _BALANCING_OPTIONS for name, _ in options):
        return []
    return [("grpc.service_config", ROUND_ROBIN)]


def _resolve(address: str) -> list[tuple[ipaddress._BaseAddress, int]]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"address {address!r} is not 'host:port'")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        return [(ipaddress.ip_address(host), int(port))]
    except ValueError:
        pass  # a name, not an IP literal
    try:
        infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    except socket.gaierror as error:
        raise ValueError(f"cannot resolve {address!r}: {error}") from None
    ips = dict.fromkeys(ipaddress.ip_address(info[4][0]) for info in infos)
    return [(ip, int(port)) for ip in ips]


def _format(ip, port: int) -> str:
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"
