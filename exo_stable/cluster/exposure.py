"""What a node tells others about reaching it (the IO half of cluster/addresses.py): this host's interface
addresses, a peer's candidate addresses as this node has seen them, and the startup notices about who may
reach the node (API key, cluster secret, join command)."""

from __future__ import annotations

import ipaddress
import logging

from exo_stable.cluster import addresses as addr
from exo_stable.cluster.peers import PeerManager
from exo_stable.cluster.security import SecretSource, is_loopback_only, join_command
from exo_stable.wire.handshake import PeerInfo

log = logging.getLogger("exo_stable.node.node")


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def interface_ips() -> list[str]:
    """Every address of this host's interfaces (IPv4 and IPv6), as zeroconf's ifaddr lists them."""
    import ifaddr

    found: list[str] = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            text = ip.ip if isinstance(ip.ip, str) else ip.ip[0]
            if text not in found:
                found.append(text)
    return found


def peer_addresses(peers: PeerManager, node_id: str, info: PeerInfo) -> list[addr.Address]:
    """Where ``node_id`` can be dialed, best first: the address this node reached it on, the address its
    own connection came from (with its advertised port), then what it advertises."""
    advertised = addr.addresses_from_capabilities(info.capabilities)
    seen: list[addr.Address] = []
    reached = peers.reached_at(node_id)
    if reached is not None:
        seen.append(reached)
    remote = peers.remote_host(node_id)
    if remote is not None and advertised:
        seen.append((remote, advertised[0][1]))
    return addr.dial_candidates(seen, advertised)


def say_who_may_join(
    host: str,
    port: int,
    *,
    api_key: str | None,
    auth: SecretSource,
    secret: bytes | None,
    secret_path: object,
    seed: addr.Address,
) -> None:
    """Warn about what a node bound to ``host`` exposes, and print how another machine joins it."""
    if is_loopback_only(host):
        return
    where = addr.format_host_port(host, port)
    if api_key is None:
        log.warning(
            "the API on %s is reachable from other machines without an API key: anyone who can reach it can"
            " use the model; set --api-key (or EXO_STABLE_API_KEY) to require one",
            where,
        )
    if auth == "insecure":
        log.warning(
            "--insecure: %s accepts any peer without a cluster secret; anyone on the network can join this"
            " cluster and see its requests",
            where,
        )
        return
    if auth in ("created", "file") and secret is not None:
        made = "created" if auth == "created" else "read"
        print(
            f"exo-stable: peers must prove the cluster secret {made} in {secret_path} (mode 0600);"
            f" join another machine with:\n  {join_command(secret, addr.format_host_port(*seed))}",
            flush=True,
        )
