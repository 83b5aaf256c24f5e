#!/usr/bin/env python3
"""masque-check.py - a client nobody here wrote (aioquic) against tower-quiche's
CONNECT-UDP proxy (examples/masque.rs, RFC 9298 over RFC 9297 HTTP datagrams).

It starts a UDP echo socket on 127.0.0.1, opens an extended CONNECT
(:protocol connect-udp, capsule-protocol: ?1) to
/.well-known/masque/udp/127.0.0.1/{echo port}/, sends UDP payloads as HTTP datagrams
with context ID 0 and checks every one comes back; then checks that a target outside
the proxy's allow-list (192.0.2.1, never contacted) is answered 403.

Usage (with the interop peers' Python, ../shared/interop/setup.sh):

    cargo run --example masque -- --listen 127.0.0.1:4433 \\
        --cert target/interop-certs/cert.pem --key target/interop-certs/key.pem &
    target/interop-venv/bin/python scripts/masque-check.py https://127.0.0.1:4433 \\
        --ca target/interop-certs/ca.pem

Loopback only, bounded: --count datagrams (default 100), each sent at most 5 times,
every wait bounded by --timeout. One line per case (PASS/FAIL), then 'N passed, M failed';
exit status 0 only when nothing failed.
"""
import argparse
import asyncio
import ssl
import sys
from urllib.parse import urlsplit

from aioquic.asyncio.client import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DatagramReceived, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import StreamReset

TEMPLATE = "/.well-known/masque/udp/{host}/{port}/"


class Echo(asyncio.DatagramProtocol):
    """Sends every UDP datagram back, at most `limit` of them."""

    def __init__(self, limit):
        self.limit = limit

    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        if self.limit > 0:
            self.limit -= 1
            self.transport.sendto(data, addr)


class MasqueClient(QuicConnectionProtocol):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # enable_webtransport makes aioquic announce SETTINGS_H3_DATAGRAM.
        self.h3 = H3Connection(self._quic, enable_webtransport=True)
        self.heads = {}
        self.datagrams = {}

    def quic_event_received(self, event):
        if isinstance(event, StreamReset) and event.stream_id in self.heads:
            fut = self.heads[event.stream_id]
            if not fut.done():
                fut.set_exception(RuntimeError(f"stream reset with 0x{event.error_code:x}"))
        for ev in self.h3.handle_event(event):
            if isinstance(ev, HeadersReceived) and ev.stream_id in self.heads:
                fut = self.heads[ev.stream_id]
                if not fut.done():
                    fut.set_result(dict(ev.headers))
            elif isinstance(ev, DatagramReceived):
                queue = self.datagrams.get(ev.stream_id)
                if queue is not None and queue.qsize() < 1000:
                    queue.put_nowait(ev.data)

    async def connect_udp(self, authority, host, port, timeout):
        stream_id = self._quic.get_next_available_stream_id()
        self.heads[stream_id] = asyncio.get_running_loop().create_future()
        self.datagrams[stream_id] = asyncio.Queue()
        self.h3.send_headers(
            stream_id,
            [
                (b":method", b"CONNECT"),
                (b":protocol", b"connect-udp"),
                (b":scheme", b"https"),
                (b":authority", authority.encode()),
                (b":path", TEMPLATE.format(host=host, port=port).encode()),
                (b"capsule-protocol", b"?1"),
            ],
            end_stream=False,
        )
        self.transmit()
        head = await asyncio.wait_for(self.heads[stream_id], timeout)
        return stream_id, head

    def send_datagram(self, stream_id, payload):
        self.h3.send_datagram(stream_id, payload)
        self.transmit()


async def case_echo(client, authority, echo_port, count, timeout):
    stream_id, head = await client.connect_udp(authority, "127.0.0.1", echo_port, timeout)
    status = head.get(b":status")
    if status != b"200":
        return f"status {status!r}, wanted 200"
    if head.get(b"capsule-protocol") != b"?1":
        return f"capsule-protocol {head.get(b'capsule-protocol')!r}, wanted ?1"
    queue = client.datagrams[stream_id]
    resent = 0
    for i in range(count):
        udp = f"datagram {i} ".encode() + bytes([i % 256]) * (i * 10 % 1000)
        for attempt in range(5):
            client.send_datagram(stream_id, b"\x00" + udp)  # context ID 0
            try:
                back = await asyncio.wait_for(queue.get(), min(1.0, timeout))
            except asyncio.TimeoutError:
                resent += 1
                continue
            if back != b"\x00" + udp:
                return f"datagram {i}: got {back[:32]!r}..., wanted context 0 and the payload"
            break
        else:
            return f"datagram {i}: no echo after 5 sends"
    return None, f"{count} datagrams echoed ({resent} resent)"


async def case_forbidden(client, authority, timeout):
    _, head = await client.connect_udp(authority, "192.0.2.1", 53, timeout)
    status = head.get(b":status")
    if status != b"403":
        return f"status {status!r}, wanted 403"
    return None, "192.0.2.1:53 refused"


async def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("url", help="the proxy, https://host:port")
    parser.add_argument("--ca", help="trust this CA (PEM)")
    parser.add_argument("--insecure", action="store_true", help="do not verify the certificate")
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--timeout", type=float, default=10.0)
    args = parser.parse_args()
    url = urlsplit(args.url)
    host, port = url.hostname, url.port or 443

    loop = asyncio.get_running_loop()
    echo_transport, _ = await loop.create_datagram_endpoint(
        lambda: Echo(args.count * 5), local_addr=("127.0.0.1", 0)
    )
    echo_port = echo_transport.get_extra_info("sockname")[1]

    config = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN, max_datagram_frame_size=65536)
    if args.insecure:
        config.verify_mode = ssl.CERT_NONE
    elif args.ca:
        config.load_verify_locations(args.ca)
    config.server_name = host

    passed = failed = 0
    try:
        async with connect(host, port, configuration=config, create_protocol=MasqueClient) as client:
            authority = f"{host}:{port}"
            for name, case in [
                ("udp_echo_through_proxy", lambda: case_echo(client, authority, echo_port, args.count, args.timeout)),
                ("target_not_allowed_403", lambda: case_forbidden(client, authority, args.timeout)),
            ]:
                try:
                    result = await asyncio.wait_for(case(), args.timeout * 10)
                except Exception as e:  # noqa: BLE001 - every failure is reported
                    result = f"{type(e).__name__}: {e}"
                if isinstance(result, tuple):
                    print(f"PASS {name} {result[1]}")
                    passed += 1
                else:
                    print(f"FAIL {name}: {result}")
                    failed += 1
    except Exception as e:  # noqa: BLE001
        print(f"FAIL connect: {type(e).__name__}: {e}")
        failed += 1
    finally:
        echo_transport.close()
    print(f"{passed} passed, {failed} failed")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
