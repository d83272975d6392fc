"""Block space and tenants set up on a running daemon through its hook socket, with the op
names of the leases contract: range_add {range, blocks: true} and tenant_create {tenant,
prefix_len, family?, max_blocks?}. Each asserts the exact reply, so a daemon without the ops
fails here, naming the op."""
from __future__ import annotations


def block_space(d, cidr: str) -> None:
    reply = d.call({"op": "range_add", "range": cidr, "blocks": True,
                    "allow_route_overlap": True})
    assert reply.get("ok") and reply.get("blocks") is True, ("range_add blocks", reply)


def tenant(d, name: str, prefix_len: int, max_blocks: int = 1, family: int = 4) -> list[str]:
    """The tenant's blocks."""
    reply = d.call({"op": "tenant_create", "tenant": name, "prefix_len": prefix_len,
                    "family": family, "max_blocks": max_blocks})
    assert reply.get("ok") and reply.get("tenant") == name, ("tenant_create", reply)
    return reply["blocks"]
