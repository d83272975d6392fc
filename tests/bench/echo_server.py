"""Baseline for the hook benchmark: a trio unix-socket server that echoes each line back.

It costs what any trio line server costs (accept, read, write); the gap between it and ipamd is
what parsing, the allocator and the commit add.
"""
import sys

import trio


async def main(path: str) -> None:
    async def handler(stream):
        buf = bytearray()
        async with stream:
            while True:
                data = await stream.receive_some(65536)
                if not data:
                    return
                buf += data
                while (nl := buf.find(b"\n")) >= 0:
                    line = bytes(buf[:nl + 1])
                    del buf[:nl + 1]
                    await stream.send_all(b'{"ok":true,"echo":' + line.rstrip() + b"}\n")

    sock = trio.socket.socket(trio.socket.AF_UNIX)
    await sock.bind(path)
    sock.listen(256)
    print("ready", flush=True)
    await trio.serve_listeners(handler, [trio.SocketListener(sock)])


if __name__ == "__main__":
    trio.run(main, sys.argv[1])
