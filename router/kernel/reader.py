"""Reading an association's socket, either side's: whatever it has, into one
reusable buffer, sliced into PDU headers and PDV fragments without copies.

Works on a plain or a TLS socket alike (``recv_into``); a TLS socket may hold
decrypted bytes that ``poll`` does not see, which :meth:`Reader.buffered` counts.
"""

from __future__ import annotations

import select
import socket
import struct
import threading
import time
from collections.abc import Iterator

BUFFER_SIZE = 256 * 1024


def kernel_timeout(sock: socket.socket, seconds: float) -> None:
    """Make ``sock`` blocking, with the kernel's own receive and send timeouts
    (SO_RCVTIMEO, SO_SNDTIMEO) of ``seconds``, instead of Python's.

    Python implements a socket's timeout with a poll() before every recv() and
    send(): two system calls, and two hand-overs of the GIL, per read (issue
    20). A read or send that times out here raises BlockingIOError, which
    :class:`Reader` turns into TimeoutError. Not for TLS sockets (ssl keeps
    Python's timeout).
    """
    whole = int(seconds)
    value = struct.pack("ll", whole, int((seconds - whole) * 1_000_000))
    sock.settimeout(None)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, value)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, value)


class Closed(ConnectionError):
    """The peer closed the connection."""


class Reader:
    """Whatever the socket has, read into one reusable buffer; PDVs are sliced out of it."""

    def __init__(self, sock: socket.socket, lock: threading.Lock | None = None) -> None:
        self.sock = sock
        self.lock = lock
        """Held while reading: a TLS socket shared with a thread that sends on it
        (a commitment report) must not be used by two threads at once (OpenSSL's
        rule); the wait for data happens outside it, in ``select``."""
        self.buf = bytearray(BUFFER_SIZE)
        self.view = memoryview(self.buf)
        self.start = self.end = 0
        self.deadline: float | None = None  # time.monotonic() by which reading must be done

    def _recv(self) -> None:
        if self.deadline is not None:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            self.sock.settimeout(remaining)
        if self.lock is None:
            try:
                got = self.sock.recv_into(self.view[self.end :])
            except BlockingIOError:  # a blocking socket's own timeout (kernel_timeout) ran out
                raise TimeoutError("no data in time") from None
        else:
            got = self._recv_locked()
        if not got:
            raise Closed
        self.end += got

    def _recv_locked(self) -> int:
        with self.lock:
            ready = self.sock.pending()
        if not ready and not select.select([self.sock], [], [], self.sock.gettimeout())[0]:
            raise TimeoutError("no data in time")
        with self.lock:
            return self.sock.recv_into(self.view[self.end :])

    def buffered(self) -> bool:
        """Whether bytes are waiting to be read without a system call: in this
        buffer, or decrypted already inside a TLS socket."""
        pending = getattr(self.sock, "pending", None)
        return self.end > self.start or (pending is not None and pending() > 0)

    def need(self, n: int) -> None:
        """Make sure ``n`` bytes from ``start`` are in the buffer."""
        if self.end - self.start >= n:
            return
        if self.start + n > len(self.buf):
            kept = bytes(self.view[self.start : self.end])
            if n > len(self.buf):
                self.view.release()
                self.buf = bytearray(n)
                self.view = memoryview(self.buf)
            self.view[: len(kept)] = kept
            self.start, self.end = 0, len(kept)
        while self.end - self.start < n:
            self._recv()

    def take(self, n: int) -> memoryview:
        """The next ``n`` bytes (valid until the next read)."""
        self.need(n)
        chunk = self.view[self.start : self.start + n]
        self.start += n
        return chunk

    def pieces(self, n: int) -> Iterator[memoryview]:
        """The next ``n`` bytes as they arrive, each piece valid until the next is asked for."""
        while n:
            if self.start == self.end:
                self.start = self.end = 0
                self._recv()
            k = min(n, self.end - self.start)
            yield self.view[self.start : self.start + k]
            self.start += k
            n -= k
