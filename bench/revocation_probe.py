"""Probe (not a test): what the server's revocation check costs per pass.

One real accounts database with U users, S logged-in sessions spread over them (stand-ins with
the fields ferry.server.revocation reads), and the real Revocation.check():

* a pass when nothing changed (the common case, once a second);
* a pass after ``ferry user``-style changes to one user (its revision moved) in another process.

    python bench/revocation_probe.py                 # 1000 users, 1000 sessions, 200 passes
    python bench/revocation_probe.py --users 10000 --sessions 5000
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from argon2 import PasswordHasher

from ferry.server.accounts import Accounts, User
from ferry.server.auth import Login
from ferry.server.revocation import Revocation


@dataclass(eq=False)
class FakeSession:
    """The fields and methods the revocation check uses."""

    login: Login | None
    user: User | None
    checked_rev: int = 0
    ended: str | None = None

    def may_run_programs(self) -> bool:
        return False

    def end(self, reason: str) -> None:
        self.ended = reason


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--users", type=int, default=1000)
    ap.add_argument("--sessions", type=int, default=1000)
    ap.add_argument("--passes", type=int, default=200)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="ferry-revocation-"))
    cheap = PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1)
    accounts = Accounts(root, hasher=cheap)
    db = sqlite3.connect(root / "users.db")
    db.executemany(
        "INSERT INTO users (name, hash) VALUES (?, ?)",
        [(f"u{i}", cheap.hash("x")) for i in range(args.users)],
    )
    db.commit()
    revocation = Revocation(accounts)
    for i in range(args.sessions):
        user = accounts.get(f"u{i % args.users}")
        assert user is not None
        revocation.add(FakeSession(Login(user, "password"), user))
    await revocation.check()  # the first pass reads everything once

    idle = []
    for _ in range(args.passes):
        t0 = time.perf_counter()
        await revocation.check()
        idle.append(time.perf_counter() - t0)
    changed = []
    for n in range(min(args.passes, 50)):
        db.execute("UPDATE users SET quota = ?, rev = rev + 1 WHERE name = 'u0'", (n,))
        db.commit()
        t0 = time.perf_counter()
        await revocation.check()
        changed.append(time.perf_counter() - t0)
    print(f"users={args.users} sessions={args.sessions}")
    print(f"pass, nothing changed:      median {statistics.median(idle) * 1e6:8.0f} us  max {max(idle) * 1e6:8.0f} us")
    print(f"pass, one user changed:     median {statistics.median(changed) * 1e6:8.0f} us  max {max(changed) * 1e6:8.0f} us")
    accounts.close()


if __name__ == "__main__":
    asyncio.run(main())
