"""``ferry sync`` and ``get -r`` / ``put -r`` re-runs as real subprocesses against ``ferry serve``: output
modes, exit statuses, and the safety properties (kill -9 of either side at any moment, sources
that change while sent, quota, deletions that stay inside the destination)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cli_inproc import run_inproc
from conftest import FERRY
from serve_process import ServeProcess

MiB = 1 << 20


def rand(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


class Served:
    """A ``ferry serve --plain`` process and the client environment for it."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.env = dict(os.environ, FERRY_HOME=str(tmp / "client-home"), PYTHONUNBUFFERED="1")
        self.env.pop("FERRY_USER", None)
        self.srv = ServeProcess(tmp / "root", self.env, plain=True).start()
        assert self.srv.password
        self.env["FERRY_PASSWORD"] = self.srv.password
        self.home = self.srv.root / "homes" / "ferry"

    def restart(self) -> None:
        """Start the server again on the same data (after it was killed)."""
        self.srv = ServeProcess(self.tmp / "root", self.env, plain=True).start()

    def url(self, path: str = "") -> str:
        return self.srv.remote(path)

    def ferry(self, *args: str, timeout: float = 90.0) -> subprocess.CompletedProcess[str]:
        return run_inproc([*args, "--plain"], self.env, timeout=timeout)

    def start(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [*FERRY, *args, "--plain"], env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )

    def log_ops(self) -> list[str]:
        text = (self.srv.root / "logs" / "ferry.log").read_text()
        return [line.split(" op=")[1].split()[0] for line in text.splitlines() if " op=" in line]


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    s = Served(tmp_path)
    try:
        yield s
    finally:
        s.srv.stop()


def ok(p: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert p.returncode == 0, f"exit {p.returncode}\nstdout: {p.stdout}\nstderr: {p.stderr}"
    return p


def records(p: subprocess.CompletedProcess[str]) -> list[dict[str, object]]:
    return [json.loads(line) for line in p.stdout.splitlines()]


def visible(root: Path) -> dict[str, bytes]:
    """Files under their final names (hidden partial files excluded)."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and ".ferry-part" not in p.name
    }


# --- output and options ----------------------------------------------------------------------


def test_itemize_json_quiet_and_exit_statuses(served: Served, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "a.txt").write_text("a")
    (src / "b.bin").write_bytes(rand(400_000, 1))
    os.symlink("b.bin", src / "link")
    p = ok(served.ferry("sync", "-i", f"{src}/", served.url("m")))
    lines = p.stdout.splitlines()
    assert "new     d/a.txt (1 B)" in lines and "skip    link: symbolic link (not copied)" in lines
    assert lines[-1].startswith("sync: ") and "3 files checked" not in lines[-1]
    assert "2 files checked, 2 sent" in lines[-1] and "1 skipped" in lines[-1]
    p = ok(served.ferry("sync", "--json", f"{src}/", served.url("m")))
    recs = records(p)
    assert recs[-1]["type"] == "summary" and recs[-1]["sent_files"] == 0 and recs[-1]["files"] == 2
    assert [r["path"] for r in recs if r["type"] == "item"] == ["link"]  # only the skip
    assert int(str(recs[-1]["wire_bytes"])) > 0
    p = ok(served.ferry("sync", "-q", "--delete", f"{src}/", served.url("m")))
    # (only --plain's own warning may remain on standard error)
    assert p.stdout == "" and all("warning: --plain" in line for line in p.stderr.splitlines())
    # usage errors: both local, both remote, a bad rate
    assert served.ferry("sync", str(src), str(tmp_path / "x")).returncode == 2
    assert served.ferry("sync", served.url("a"), served.url("b")).returncode == 2
    assert served.ferry("sync", "--bwlimit", "fast", f"{src}/", served.url("m")).returncode == 2
    # a missing source: not found, and nothing deleted
    p = served.ferry("sync", "--delete", served.url("nope/"), str(src))
    assert p.returncode == 4 and (src / "b.bin").exists()


def test_get_r_and_put_r_reruns_skip_unchanged_files(served: Served, tmp_path: Path) -> None:
    src = tmp_path / "tree"
    (src / "sub").mkdir(parents=True)
    for i in range(20):
        (src / "sub" / f"f{i}").write_bytes(b"x" * i)
    (src / "big").write_bytes(rand(2 * MiB, 2))
    (rec,) = records(ok(served.ferry("put", "-r", "--json", str(src), served.url(""))))
    assert rec["files"] == 21 and rec["sent_files"] == 21
    (rec,) = records(ok(served.ferry("put", "-r", "--json", str(src), served.url(""))))
    assert rec["sent_files"] == 0 and rec["unchanged"] == 21
    (rec,) = records(ok(served.ferry("put", "-r", "--json", "--force", str(src), served.url(""))))
    assert rec["sent_files"] == 21
    down = tmp_path / "down"
    down.mkdir()
    ok(served.ferry("get", "-r", "-q", served.url("tree"), str(down)))
    (rec,) = records(ok(served.ferry("get", "-r", "--json", served.url("tree"), str(down))))
    assert rec["sent_files"] == 0 and visible(down / "tree") == visible(src)
    before = served.log_ops()
    (src / "sub" / "f3").write_bytes(b"changed")
    (rec,) = records(ok(served.ferry("put", "-r", "--json", str(src), served.url(""))))
    assert rec["sent_files"] == 1
    assert served.log_ops()[len(before) :].count("put-tree") == 1  # one small file, one batch


def test_put_r_rerun_resumes_an_interrupted_large_file(served: Served, tmp_path: Path) -> None:
    src = tmp_path / "tree"
    src.mkdir()
    data = rand(12 * MiB, 3)
    (src / "big").write_bytes(data)
    proc = served.start("put", "-r", "-q", "--bwlimit", "4M", str(src), served.url(""))
    deadline = time.monotonic() + 30
    part = None
    while time.monotonic() < deadline and proc.poll() is None:  # wait until a good part arrived
        parts = list((served.home / "tree").glob(".big.ferry-part-*")) if (served.home / "tree").exists() else []
        if parts and parts[0].stat().st_size >= 5 * MiB:
            part = parts[0]
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    assert part is not None, "the upload never got half-way"
    assert not (served.home / "tree" / "big").exists()
    (rec,) = records(ok(served.ferry("put", "-r", "--json", str(src), served.url(""))))
    assert (served.home / "tree" / "big").read_bytes() == data
    assert rec["sent_files"] == 1 and rec["literal_bytes"] <= 8 * MiB  # the rest, not the whole file


# --- kill -9 at any moment ------------------------------------------------------------------


def make_versions(root: Path, version: int) -> dict[str, bytes]:
    """Version 1 or 2 of a tree: small files rewritten, a large one changed in the middle (delta),
    one added."""
    big = bytearray(rand(8 * MiB, 10))
    files = {f"s/f{i}.txt": b"v%d file %d\n" % (version, i) * (i + 1) for i in range(30)}
    if version == 2:
        big[3 * MiB : 4 * MiB] = rand(MiB, 11)
        files["new.bin"] = rand(3 * MiB, 12)
    files["big.bin"] = bytes(big)
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def old_or_new(dest: Path, old: dict[str, bytes], new: dict[str, bytes]) -> None:
    for rel, data in visible(dest).items():
        assert data in (old.get(rel), new.get(rel)), f"{rel} is neither its old nor its new content"


@pytest.mark.parametrize("direction", ["push", "pull"])
def test_kill_client_at_any_moment(served: Served, tmp_path: Path, direction: str) -> None:
    new_src = tmp_path / "new"
    new = make_versions(new_src, 2)
    old = make_versions(tmp_path / "old", 1)
    if direction == "push":
        dest, args = served.home / "t", (f"{new_src}/", served.url("t"))
        make_versions(dest, 1)
    else:
        (served.home / "t").mkdir()
        make_versions(served.home / "t", 2)
        dest, args = tmp_path / "dest", (served.url("t/"), str(tmp_path / "dest"))
        make_versions(dest, 1)
    for delay in (0.4, 0.8, 1.2, 1.6):
        proc = served.start("sync", "-q", "--bwlimit", "2M", *args)
        time.sleep(delay)
        assert proc.poll() is None, "the sync ended before it could be killed: make it slower"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        old_or_new(dest, old, new)
    ok(served.ferry("sync", "-q", *args))
    assert visible(dest) == new


def test_kill_server_at_any_moment(served: Served, tmp_path: Path) -> None:
    new_src = tmp_path / "new"
    new = make_versions(new_src, 2)
    old = make_versions(tmp_path / "old", 1)
    dest = served.home / "t"
    make_versions(dest, 1)
    for delay in (0.5, 1.2):
        proc = served.start("sync", "-q", "--bwlimit", "2M", f"{new_src}/", served.url("t"))
        time.sleep(delay)
        assert proc.poll() is None, "the sync ended before the server could be killed: make it slower"
        served.srv.stop(signal.SIGKILL)
        proc.wait(30)
        assert proc.returncode != 0
        old_or_new(dest, old, new)
        served.restart()
    ok(served.ferry("sync", "-q", f"{new_src}/", served.url("t")))
    assert visible(dest) == new


# --- sources that change, quota, deletions -------------------------------------------------------


def test_source_changing_while_sent_is_detected(served: Served, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "big").write_bytes(rand(6 * MiB, 20))
    stop = threading.Event()

    def scribble() -> None:
        n = 0
        while not stop.is_set():
            with open(src / "big", "r+b") as f:
                f.seek(random.randrange(6 * MiB - 100))
                f.write(b"%d" % n)
            n += 1
            time.sleep(0.02)

    t = threading.Thread(target=scribble, daemon=True)
    t.start()
    try:
        p = served.ferry("sync", "--json", "--bwlimit", "8M", f"{src}/", served.url("c"))
    finally:
        stop.set()
        t.join()
    assert p.returncode == 5, p.stderr
    (item,) = [r for r in records(p) if r.get("type") == "item" and r.get("path") == "big"]
    assert "changed" in str(item["error"])
    assert not (served.home / "c" / "big").exists()  # never stored half old, half new
    ok(served.ferry("sync", "-q", f"{src}/", served.url("c")))  # once it is quiet, it goes
    assert (served.home / "c" / "big").read_bytes() == (src / "big").read_bytes()


def test_quota_fails_before_sending(tmp_path: Path) -> None:
    s = Served(tmp_path)
    try:
        ok(run_inproc(["user", "mod", "ferry", "--quota", "1M", "--root", str(s.srv.root)], s.env))
        src = tmp_path / "src"
        src.mkdir()
        for i in range(5):
            (src / f"f{i}").write_bytes(rand(300_000, i))
        p = s.ferry("sync", f"{src}/", s.url("q"))
        assert p.returncode == 5 and "quota" in p.stderr
        assert not (s.home / "q").exists() or not any((s.home / "q").iterdir())
        assert "put-tree" not in s.log_ops() and "put" not in s.log_ops()
    finally:
        s.srv.stop()


def test_delete_stays_inside_dest(served: Served, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "keep").write_text("k")
    outside = served.home / "outside"
    outside.mkdir()
    (outside / "precious").write_text("p")
    (served.home / "sibling.txt").write_text("s")
    dest = served.home / "d"
    dest.mkdir()
    (dest / "gone").write_text("g")
    os.symlink("../outside", dest / "link")  # a link inside DEST: removed itself, never followed
    ok(served.ferry("sync", "--delete", f"{src}/", served.url("d")))
    assert sorted(os.listdir(dest)) == ["keep"]
    assert (outside / "precious").read_text() == "p" and (served.home / "sibling.txt").exists()
    # and locally: a link in the local DEST to a folder outside it
    local = tmp_path / "local"
    local.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "precious").write_text("p")
    os.symlink(elsewhere, local / "link")
    (local / "gone").write_text("g")
    ok(served.ferry("sync", "--delete", served.url("d/"), str(local)))
    assert sorted(os.listdir(local)) == ["keep"] and (elsewhere / "precious").read_text() == "p"


def test_delete_after_a_local_read_error_deletes_nothing(served: Served, tmp_path: Path) -> None:
    """``ferry sync`` lists the local side in a thread started before it connects: an entry that
    could not be read there still holds back ``--delete`` (both directions), and a source that is
    gone is an error that deletes nothing."""
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    for name in ("a", "sub/b", "sub/c"):
        (src / name).write_text(name)
    ok(served.ferry("sync", "-q", f"{src}/", served.url("t")))
    (src / "a").unlink()
    bad = os.fsencode(src / "sub") + b"/\xff-not-utf8"
    with open(bad, "wb") as f:
        f.write(b"x")
    p = ok(served.ferry("sync", "--json", "--delete", f"{src}/", served.url("t")))
    summary = records(p)[-1]
    assert summary["deleted"] == 0 and "nothing was deleted" in " ".join(summary["notes"])  # type: ignore[arg-type]
    assert (served.home / "t" / "a").read_text() == "a"
    # a pull whose local side (the destination) has an unreadable entry deletes nothing locally
    local = tmp_path / "local"
    ok(served.ferry("sync", "-q", served.url("t/"), str(local)))
    (served.home / "t" / "sub" / "c").unlink()
    with open(os.fsencode(local / "sub") + b"/\xfe-not-utf8", "wb") as f:
        f.write(b"y")
    ok(served.ferry("sync", "-q", "--delete", served.url("t/"), str(local)))
    # (the destination's unreadable entry is not deleted; what the source lacks is)
    assert not (local / "sub" / "c").exists() and os.path.exists(os.fsencode(local / "sub") + b"/\xfe-not-utf8")
    # the source gone: an error, nothing deleted
    for name in ("sub/b", "sub/c"):
        (src / name).unlink(missing_ok=True)
    os.unlink(bad)
    (src / "sub").rmdir()
    src.rmdir()
    p = served.ferry("sync", "--delete", f"{src}/", served.url("t"))
    assert p.returncode == 4, p.stderr
    assert (served.home / "t" / "sub" / "b").read_text() == "sub/b"


def test_filters_pick_the_same_files_both_ways(served: Served, tmp_path: Path) -> None:
    src = tmp_path / "src"
    names = ["a.c", "a.h", "lib/b.c", "lib/b.o", "build/x.c", "docs/r.md", "lib/deep/c.c"]
    for n in names:
        (src / n).parent.mkdir(parents=True, exist_ok=True)
        (src / n).write_text(n)
    # order matters (the last matching rule wins): a rule file keeps it; --exclude / --include
    # come after the file's rules, includes last
    rules = tmp_path / "rules"
    rules.write_text("# C sources only, no build output\n*\n!*/\n!*.c\n/build/\n")
    args = ["--filter-from", str(rules), "--exclude", "*.h"]
    ok(served.ferry("sync", *args, f"{src}/", served.url("up")))
    pushed = set(visible(served.home / "up"))
    (served.home / "all").mkdir()
    for n in names:
        (served.home / "all" / n).parent.mkdir(parents=True, exist_ok=True)
        (served.home / "all" / n).write_text(n)
    ok(served.ferry("sync", *args, served.url("all/"), str(tmp_path / "down")))
    pulled = set(visible(tmp_path / "down"))
    assert pushed == pulled == {"a.c", "lib/b.c", "lib/deep/c.c"}


def test_one_bar_for_the_job_even_on_a_narrow_terminal(served: Served, tmp_path: Path) -> None:
    import pexpect

    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        (src / f"f{i}").write_bytes(rand(2 * MiB, 30 + i))
    child = pexpect.spawn(
        FERRY[0],
        [*FERRY[1:], "sync", "--bwlimit", "3M", f"{src}/", served.url("bar"), "--plain"],
        env={**served.env, "TERM": "xterm"},
        dimensions=(24, 40),
        timeout=60,
    )
    out = child.read().decode(errors="replace")
    child.close()
    assert child.exitstatus == 0, out
    # bytes done of the job's total and a rate, within 40 columns
    assert "/6.0 MiB" in out and "/s" in out, out


def test_bwlimit_and_compress_on_get_and_put(served: Served, tmp_path: Path) -> None:
    data = rand(3 * MiB, 70)
    (tmp_path / "f.bin").write_bytes(data)
    t0 = time.monotonic()
    ok(served.ferry("put", "-q", "--bwlimit", "1M", str(tmp_path / "f.bin"), served.url("f.bin")))
    assert time.monotonic() - t0 >= 2.0  # 3 MiB at 1 MiB/s (a 128 KiB burst): never faster
    t0 = time.monotonic()
    ok(served.ferry("get", "-q", "--bwlimit", "1M", served.url("f.bin"), str(tmp_path / "back.bin")))
    assert time.monotonic() - t0 >= 2.0
    assert (tmp_path / "back.bin").read_bytes() == data
    text = b"".join(b"line %d of a very repetitive log file\n" % (i % 100) for i in range(200_000))
    (tmp_path / "t.log").write_bytes(text)
    (rec,) = records(ok(served.ferry("put", "-z", "--json", str(tmp_path / "t.log"), served.url("t.log"))))
    assert rec["sent"] < len(text) // 10 and (served.home / "t.log").read_bytes() == text
    (rec,) = records(ok(served.ferry("get", "-z", "--json", served.url("t.log"), str(tmp_path / "t2.log"))))
    assert rec["sent"] < len(text) // 10 and (tmp_path / "t2.log").read_bytes() == text
