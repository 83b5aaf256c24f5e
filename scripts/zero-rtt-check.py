#!/usr/bin/env python3
"""0-RTT check with a third-party client (aioquic): a resumed connection's GET is sent in
0-RTT and the server accepts and answers it.

    python scripts/zero-rtt-check.py https://127.0.0.1:4433/hello --ca ca.pem

Connects once to take a session ticket, then connects again with it and sends the GET
before the handshake completes. Passes when the GET left in 0-RTT packets (aioquic's own
packet log says so), the server accepted the early data (its EncryptedExtensions say so)
and the answer is 200. Exits non-zero otherwise. Use the interop venv's Python
(../shared/interop/setup.sh), which has aioquic.
"""

import argparse
import asyncio
import ssl
import sys
from urllib.parse import urlparse

from aioquic.asyncio import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DataReceived, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.logger import QuicLogger


class H3Client(QuicConnectionProtocol):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.h3 = H3Connection(self._quic)
        self.responses = {}

    def quic_event_received(self, event):
        for ev in self.h3.handle_event(event):
            if isinstance(ev, (HeadersReceived, DataReceived)) and ev.stream_id in self.responses:
                response = self.responses[ev.stream_id]
                if isinstance(ev, HeadersReceived):
                    response["headers"] = dict(ev.headers)
                else:
                    response["body"] += ev.data
                if ev.stream_ended:
                    response["done"].set_result(None)

    async def get(self, authority, path):
        stream_id = self._quic.get_next_available_stream_id()
        done = asyncio.get_running_loop().create_future()
        self.responses[stream_id] = {"headers": {}, "body": b"", "done": done}
        self.h3.send_headers(
            stream_id,
            [
                (b":method", b"GET"),
                (b":scheme", b"https"),
                (b":authority", authority.encode()),
                (b":path", path.encode()),
            ],
            end_stream=True,
        )
        self.transmit()
        await done
        response = self.responses[stream_id]
        return stream_id, response["headers"].get(b":status"), response["body"]


def sent_in_0rtt(logger, stream_id):
    """Whether a STREAM frame of `stream_id` left in a 0-RTT packet, per aioquic's log."""
    for trace in logger.to_dict()["traces"]:
        for event in trace["events"]:
            if event.get("name") != "transport:packet_sent":
                continue
            data = event.get("data", {})
            if data.get("header", {}).get("packet_type") != "0RTT":
                continue
            for frame in data.get("frames", []):
                if frame.get("frame_type") == "stream" and frame.get("stream_id") == stream_id:
                    return True
    return False


async def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url")
    parser.add_argument("--ca", help="CA certificate (PEM) to trust")
    parser.add_argument("--timeout", type=float, default=10)
    args = parser.parse_args()
    url = urlparse(args.url)
    host, port = url.hostname, url.port or 443
    authority = url.netloc
    path = url.path or "/"

    tickets = []

    def configuration(logger=None):
        config = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN, quic_logger=logger)
        config.server_name = "localhost" if host in ("127.0.0.1", "::1") else host
        if args.ca:
            config.load_verify_locations(args.ca)
        else:
            config.verify_mode = ssl.CERT_NONE
        return config

    # First connection: a full handshake; the server's NewSessionTicket is kept.
    async with connect(
        host, port, configuration=configuration(), create_protocol=H3Client,
        session_ticket_handler=tickets.append,
    ) as client:
        _, status, _ = await asyncio.wait_for(client.get(authority, path), args.timeout)
        if status != b"200":
            sys.exit(f"FAIL: first GET answered {status!r}")
        # The ticket comes right after the handshake; give it a moment to arrive.
        for _ in range(100):
            if tickets:
                break
            await asyncio.sleep(0.01)
    if not tickets:
        sys.exit("FAIL: the server sent no session ticket")
    if not tickets[-1].max_early_data_size:
        sys.exit("FAIL: the server's session ticket does not allow early data")

    # Second connection: resumed, the GET sent before the handshake completes.
    logger = QuicLogger()
    config = configuration(logger)
    config.session_ticket = tickets[-1]
    async with connect(
        host, port, configuration=config, create_protocol=H3Client, wait_connected=False,
    ) as client:
        stream_id, status, body = await asyncio.wait_for(client.get(authority, path), args.timeout)
        resumed = client._quic.tls.session_resumed
        accepted = client._quic.tls.early_data_accepted
    early = sent_in_0rtt(logger, stream_id)
    print(f"resumed={resumed} early_data_accepted={accepted} get_sent_in_0rtt={early} status={status.decode()} "
          f"body={len(body)} bytes")
    if not (resumed and accepted and early and status == b"200"):
        sys.exit("FAIL: the GET was not sent and accepted in 0-RTT")
    print("PASS: a resumed connection's GET was sent in 0-RTT and answered 200")


if __name__ == "__main__":
    asyncio.run(main())
