"""How fast could a large TLS download go without asyncio's memory-BIO TLS? (a benchmark, not a test)

ferry's TLS downloads run through the event loop's SSL transport: OpenSSL encrypts into and decrypts
from in-memory BIOs, and the loop calls ``SSLObject.read`` once per 16 KiB record. This probe
measures the alternative proposed for the bulk path: plain blocking ``ssl.SSLSocket`` objects, where
OpenSSL reads and writes the socket itself. A forked sender ``sendall``s 1 MiB blocks read with
``preadv``; the receiver ``recv_into``s 4 MiB buffers, ``pwrite``s them to a file and hashes them
with BLAKE3 (what a ferry download must do). Same machine, loopback, tmpfs, same 1 GiB random file.

    .venv/bin/python bench/tls_bulk_probe.py [--size-mib 1024] [--repeat 5]
    .venv/bin/python bench/tls_bulk_probe.py --once SRC DST   # one run; prints its seconds

Prints MiB/s and CPU seconds per side for each run, then the medians. ``bench/transfer.py`` runs
``--once`` as its ``raw-tls`` tool, so the Python TLS limit stands in the same table as ferry-tls
and ``scp -c aes128-gcm`` (noise between separate runs is large).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import socket
import ssl
import sys
import time
from pathlib import Path

import blake3
import trustme

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import MiB, log, make_big_file, median, prewarm, scratch_dir

BLOCK = 1 << 20
BUF = 4 << 20


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _sender(lsock: socket.socket, cert_pem: bytes, key_pem: bytes, src: str, size: int, q: mp.Queue) -> None:  # type: ignore[type-arg]
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    certfile = Path(src).with_name("cert.pem")
    certfile.write_bytes(cert_pem + key_pem)
    ctx.load_cert_chain(certfile)
    conn, _ = lsock.accept()
    with ctx.wrap_socket(conn, server_side=True) as s:
        fd = os.open(src, os.O_RDONLY)
        buf = bytearray(BLOCK)
        view = memoryview(buf)
        c0 = _cpu()
        pos = 0
        while pos < size:
            n = os.preadv(fd, [buf], pos)
            s.sendall(view[:n])
            pos += n
        q.put(_cpu() - c0)
        s.recv(1)  # wait for the receiver to finish before closing
        os.close(fd)


def one_run(src: Path, dst: Path, size: int) -> tuple[float, float, float, str]:
    """One transfer of ``src`` into ``dst`` (kept): (seconds, receiver CPU s, sender CPU s, cipher)."""
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    with socket.socket() as lsock:
        lsock.bind(("127.0.0.1", 0))
        lsock.listen()
        q: mp.Queue = mp.Queue()  # type: ignore[type-arg]
        key_pem = cert.private_key_pem.bytes()
        chain = b"".join(b.bytes() for b in cert.cert_chain_pems)
        proc = mp.Process(target=_sender, args=(lsock, chain, key_pem, str(src), size, q))
        proc.start()
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ca.configure_trust(ctx)
        raw = socket.create_connection(lsock.getsockname(), timeout=60)
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
            cipher = s.cipher()[0]  # type: ignore[index]
            fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            h = blake3.blake3()
            bufs = [bytearray(BUF), bytearray(BUF)]
            c0, t0 = _cpu(), time.monotonic()
            pos = i = 0
            while pos < size:
                view = memoryview(bufs[i & 1])
                fill = 0
                while fill < BUF and pos + fill < size:
                    n = s.recv_into(view[fill:], min(BUF - fill, size - pos - fill))
                    if not n:
                        raise SystemExit("the sender closed early")
                    fill += n
                os.pwrite(fd, view[:fill], pos)
                h.update(view[:fill])
                pos += fill
                i += 1
            seconds, cpu = time.monotonic() - t0, _cpu() - c0
            os.close(fd)
            s.sendall(b"x")
            sender_cpu = q.get(timeout=60)
        proc.join(60)
    return seconds, cpu, sender_cpu, cipher


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--once", nargs=2, metavar=("SRC", "DST"), help="one run, no prewarm; print seconds")
    args = ap.parse_args()
    if args.once:
        src, dst = map(Path, args.once)
        print(f"{one_run(src, dst, src.stat().st_size)[0]:.6f}")
        return
    size = args.size_mib * MiB
    with scratch_dir(size * 3 + 256 * MiB, prefix="ferry-tls-probe-") as scratch:
        src, dst = scratch / "src.bin", scratch / "dst.bin"
        make_big_file(src, size)
        rates, rcpu, scpu = [], [], []
        for k in range(args.repeat):
            prewarm(scratch, size, [src])
            seconds, cpu, sender_cpu, cipher = one_run(src, dst, size)
            dst.unlink()
            rate = size / MiB / seconds
            log(
                f"run {k + 1}: {rate:,.0f} MiB/s, receiver CPU {cpu:.2f} s, sender CPU {sender_cpu:.2f} s ({cipher})"
            )
            rates.append(rate)
            rcpu.append(cpu)
            scpu.append(sender_cpu)
        print(
            f"blocking SSLSocket bulk, {args.size_mib} MiB, median of {args.repeat}: "
            f"{median(rates):,.0f} MiB/s, receiver CPU {median(rcpu):.2f} s, sender CPU {median(scpu):.2f} s"
        )


if __name__ == "__main__":
    main()
