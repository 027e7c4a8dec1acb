"""A scripted ferry 'server' for the faults a real one never makes (fault injection, as asyncssh's
tests do): plain TCP on 127.0.0.1:0, logs anyone in, answers Ping and Cancel; subclasses script
the rest in :meth:`FakeServer.answer`."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from ferry.client.aclient import AsyncClient
from ferry.client.known_hosts import KnownHosts
from ferry.wire import CONNECTION_ENDED, NEED_DATA, Connection, Data, Role
from ferry.wire import messages as m


class FakeServer:
    """A plain-TCP ferry 'server' that logs anyone in and answers GetTree with scripted batches."""

    def __init__(self, batches: list[list[m.TreeItem]]) -> None:
        self.batches = batches
        self.received: list[m.Message] = []
        self.port = 0

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = Connection(Role.SERVER)
        try:
            while True:
                ev = conn.next_event()
                if ev is NEED_DATA:
                    data = await reader.read(65536)
                    conn.receive_data(data)
                    continue
                if ev is CONNECTION_ENDED or isinstance(ev, m.Goodbye):
                    return
                if isinstance(ev, Data):
                    continue
                assert isinstance(ev, m.Message)
                self.received.append(ev)
                if isinstance(ev, m.Hello):
                    writer.write(conn.send(m.Welcome(version=1, features=["tree"])))
                elif isinstance(ev, m.Auth):
                    writer.write(conn.send(m.AuthOk(user=ev.user)))
                elif isinstance(ev, m.Cancel):
                    writer.write(conn.send(m.Ok(id=ev.id)))
                elif isinstance(ev, m.Ping):
                    writer.write(conn.send(m.Pong(nonce=ev.nonce)))
                else:
                    await self.answer(conn, writer, ev)
                await writer.drain()
        except (ConnectionError, OSError):
            return
        finally:
            writer.close()

    async def answer(self, conn: Connection, writer: asyncio.StreamWriter, ev: m.Message) -> None:
        """Answer a request other than the log-in, Cancel and Ping: here GetTree, with the script."""
        if isinstance(ev, m.GetTree):
            for i, items in enumerate(self.batches):
                end = i == len(self.batches) - 1
                writer.write(conn.send(m.TreeItems(id=ev.id, items=items, end=end)))
                await writer.drain()  # a long script must not sit in our own buffer

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[FakeServer]:
        server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        try:
            yield self
        finally:
            server.close()

    async def client(self, tmp_path: Path) -> AsyncClient:
        c = await AsyncClient.connect(
            "127.0.0.1",
            self.port,
            user="u",
            password="p",
            plain=True,
            known_hosts=KnownHosts(tmp_path / "known_hosts"),
        )
        c.read_timeout = 10.0
        return c
