"""A gRPC call whose client decides when it takes the answer, over a raw HTTP/2 connection (the `h2` protocol machine).

For what a gateway holds for clients that do not read their answers: tests/integration/test_gateway_grpc.py and
bench/grpc_unsent.py.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections.abc import Sequence

import h2.config
import h2.connection
import h2.events
import h2.exceptions


class HeldGrpcCall:
    """One gRPC call over an HTTP/2 connection of its own whose client decides when it takes the answer.

    It sends its request messages whole, ending the request stream, as fast as the server reads them (`sent` says when
    all are), and leaves its receive window at HTTP/2's initial 64 KB and its socket's receive buffer at 4 KB until
    `take`: the server can send no more than that of the answer meanwhile. A thread keeps reading frames and answering
    the server's pings and settings, as a client that is alive but does not read its answer, until `freeze` stops it
    reading at all (a frozen process). A gRPC client library cannot be told to do either, hence the h2 protocol
    machine."""

    def __init__(self, address: str, method: str, messages: Sequence[bytes]) -> None:
        host, port = address.rsplit(":", 1)
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.connect((host, int(port)))
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.received = bytearray()  # the answer's DATA so far: gRPC-framed messages
        self.headers: dict[bytes, bytes] = {}  # the response's headers and trailers (grpc-status, grpc-message)
        self.ended = threading.Event()  # the stream ended, or the connection closed
        self._taking = False
        self._frozen = threading.Event()
        self._lock = threading.Lock()
        self.conn.initiate_connection()
        self.stream = self.conn.get_next_available_stream_id()
        head = [(":method", "POST"), (":scheme", "http"), (":path", method), (":authority", address)]
        self.conn.send_headers(self.stream, [*head, ("content-type", "application/grpc"), ("te", "trailers")])
        self._request = b"".join(b"\0" + struct.pack(">I", len(m)) + m for m in messages)  # what is left to send
        self.sent = threading.Event()  # the whole request is sent
        self._send()
        self.sock.settimeout(0.1)  # the thread looks at `freeze` this often
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    def take(self, timeout: float) -> list[bytes]:
        """Open the windows, read the answer to its end and return its messages."""
        with self._lock:
            self._taking = True
            self.conn.increment_flow_control_window(1 << 30)
            self.conn.increment_flow_control_window(1 << 30, stream_id=self.stream)
            self._flush()
        assert self.ended.wait(timeout), f"the answer did not end in {timeout} s ({len(self.received)} bytes so far)"
        return self.messages()

    def trickle(self, rate: int, seconds: float) -> None:
        """Take the answer at about `rate` bytes a second for `seconds` (a slow link): open the windows by a tenth of
        it every tenth of a second."""
        step, end = max(1, rate // 10), time.monotonic() + seconds
        while time.monotonic() < end and not self.ended.is_set():
            with self._lock, contextlib.suppress(h2.exceptions.StreamClosedError):
                self.conn.increment_flow_control_window(step)
                self.conn.increment_flow_control_window(step, stream_id=self.stream)
                self._flush()
            time.sleep(0.1)

    def freeze(self) -> None:
        """Read nothing more: the server's pings go unanswered from now on."""
        self._frozen.set()
        self._thread.join(10)

    def messages(self) -> list[bytes]:
        found, at = [], 0
        while at + 5 <= len(self.received):
            (size,) = struct.unpack(">I", self.received[at + 1 : at + 5])
            found.append(bytes(self.received[at + 5 : at + 5 + size]))
            at += 5 + size
        return found

    def read_to_end(self, timeout: float) -> int:
        """After `freeze`: read what the connection still gives until it closes; the bytes read."""
        self.sock.settimeout(timeout)
        total = 0
        with contextlib.suppress(ConnectionResetError):
            while chunk := self.sock.recv(1 << 16):
                total += len(chunk)
        return total

    def close(self) -> None:
        self._frozen.set()
        self._thread.join(10)
        self.sock.close()

    def _send(self) -> None:
        """The request's DATA, as far as the server's windows let it now (the thread sends the rest as they open)."""
        while self._request:
            room = min(self.conn.local_flow_control_window(self.stream), self.conn.max_outbound_frame_size, len(self._request))
            if not room:
                break
            self.conn.send_data(self.stream, self._request[:room], end_stream=room == len(self._request))
            self._request = self._request[room:]
        self._flush()
        if not self._request:
            self.sent.set()

    def _flush(self) -> None:
        if out := self.conn.data_to_send():
            self.sock.sendall(out)

    def _read(self) -> bool:
        chunk = self.sock.recv(1 << 16)
        with self._lock:
            if not chunk:
                self.ended.set()
                return False
            for event in self.conn.receive_data(chunk):
                if isinstance(event, h2.events.DataReceived):
                    self.received += event.data
                    if self._taking:
                        self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.ResponseReceived | h2.events.TrailersReceived):
                    self.headers |= {bytes(k): bytes(v) for k, v in event.headers}
                elif isinstance(event, h2.events.StreamEnded | h2.events.StreamReset | h2.events.ConnectionTerminated):
                    self.ended.set()
            if self._request and not self.ended.is_set():
                self._send()
            self._flush()
        return not self.ended.is_set()

    def _pump(self) -> None:
        with contextlib.suppress(OSError, h2.exceptions.ProtocolError):
            while not self._frozen.is_set():
                try:
                    if not self._read():
                        return
                except TimeoutError:
                    continue
        if not self._frozen.is_set():
            self.ended.set()
