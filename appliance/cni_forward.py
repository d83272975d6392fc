"""CNI mode of the ipamd executable: hand the runtime's env and stdin to the daemon, print its
answer. No logic of its own beyond finding the socket and saying when the daemon is not there.

dist/ipamd-cni (packaging/cni-forward.c) does the same in C, without Python's start-up cost.
"""
import json
import os
import socket
import sys

from .paths import default_socket

MAX_STDIN = 1 << 20


def socket_path(stdin: bytes) -> str:
    """ipam.socket from the network config, else $IPAMD_SOCKET, else the default."""
    try:
        ipam = json.loads(stdin).get("ipam")
        if isinstance(ipam, dict) and isinstance(ipam.get("socket"), str):
            return ipam["socket"]
    except (ValueError, AttributeError, RecursionError):
        pass  # the daemon names what is wrong with the config
    return str(default_socket())


def _fail(code: int, msg: str, details: str) -> int:
    out = {"cniVersion": "1.1.0", "code": code, "msg": msg, "details": details}
    sys.stdout.write(json.dumps(out, indent=4))
    return 1


def main() -> int:
    stdin = sys.stdin.buffer.read(MAX_STDIN + 1)
    env = {k.decode("latin-1"): v.decode("latin-1") for k, v in os.environb.items()
           if k.startswith(b"CNI_")}
    request = json.dumps({"v": 1, "op": "cni", "env": env, "stdin": stdin.decode("latin-1")})
    path = socket_path(stdin)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(60)
            s.connect(path)
            s.sendall(request.encode() + b"\n")
            f = s.makefile("rb")
            head = json.loads(f.readline() or b"null")
            if not isinstance(head, dict) or not head.get("ok"):
                return _fail(999, "ipamd refused the request", json.dumps(head))
            out = f.read(head["length"])
    except (OSError, ValueError) as e:
        unavailable = env.get("CNI_COMMAND") == "STATUS"
        return _fail(50 if unavailable else 11,
                     "the ipamd daemon is not available" if unavailable
                     else "cannot reach the ipamd daemon; try again later",
                     f"{path}: {e}")
    sys.stdout.buffer.write(out)
    sys.stdout.flush()
    return head["exit"]
