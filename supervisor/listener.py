"""LISTEN for work notifications on a dedicated autocommit connection.

Notifications are hints, never the source of truth: Postgres does not replay
those sent while the connection was down, so after every reconnect the
listener reports ``reconnected`` and the supervisor polls. A lost hint thus
costs at most one poll interval.
"""

from __future__ import annotations

import json
import logging
import queue
import socket
import threading

import psycopg
from psycopg import sql
from supervisor.db import libpq_url

logger = logging.getLogger(__name__)

RECONNECT_DELAY_SECONDS_MAX = 10.0


class Listener:
    """A background thread that LISTENs on channels and queues the notifications.

    Each notification also writes a byte to ``wakeup``, a socket the main loop
    can include in its ``multiprocessing.connection.wait`` call, so a new job
    wakes the supervisor at once instead of at its next poll.
    """

    def __init__(self, url: str, channels: list[str], supervisor_id: str):
        self._url = libpq_url(url)
        self._channels = channels
        self._supervisor_id = supervisor_id
        self._queue: queue.SimpleQueue[dict] = queue.SimpleQueue()
        self._stop = threading.Event()
        self.wakeup, self._wakeup_writer = socket.socketpair()
        self.wakeup.setblocking(False)
        self._thread = threading.Thread(target=self._run, name="listener", daemon=True)
        self._connection: psycopg.Connection | None = None
        # pid of the server process behind the listening connection.
        self.backend_pid: int | None = None

    def start(self) -> None:
        self._thread.start()

    def drain(self) -> list[dict]:
        """Return the notifications received since the last call."""
        try:
            while self.wakeup.recv(4096):
                pass
        except BlockingIOError:
            pass
        items = []
        while True:
            try:
                items.append(self._queue.get_nowait())
            except queue.Empty:
                return items

    def _put(self, item: dict) -> None:
        self._queue.put(item)
        try:
            self._wakeup_writer.send(b"x")
        except (BlockingIOError, OSError):
            pass  # a full socket already guarantees a wake-up

    def _run(self) -> None:
        delay = 0.5
        first = True
        while not self._stop.is_set():
            try:
                with psycopg.connect(self._url, autocommit=True, application_name="analysis-jobs-listener",
                                     connect_timeout=10) as connection:
                    self._connection = connection
                    self.backend_pid = connection.info.backend_pid
                    for channel in self._channels:
                        connection.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
                    if not first:
                        logger.info("listener reconnected", extra={"event": "listener_reconnected",
                                                                   "supervisor_id": self._supervisor_id})
                        self._put({"kind": "reconnected"})
                    first = False
                    delay = 0.5
                    while not self._stop.is_set():
                        for notification in connection.notifies(timeout=1.0):
                            self._put(self._parse(notification))
            except psycopg.Error as error:
                if self._stop.is_set():
                    return
                logger.warning("listener connection lost; reconnecting",
                               extra={"event": "listener_disconnected", "error": str(error),
                                      "retry_in_seconds": delay, "supervisor_id": self._supervisor_id})
                self._stop.wait(delay)
                delay = min(RECONNECT_DELAY_SECONDS_MAX, delay * 2)
            finally:
                self._connection = None

    @staticmethod
    def _parse(notification) -> dict:
        try:
            payload = json.loads(notification.payload)
        except ValueError:
            payload = {"kind": "unknown"}
        payload["channel"] = notification.channel
        return payload

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=3)
        self.wakeup.close()
        self._wakeup_writer.close()
