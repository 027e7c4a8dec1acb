"""The client side of login: which credentials to try, in which order, and the messages for each.

Order (as ssh does, docs/cli.md "How ferry logs in"):

1. a token (``FERRY_TOKEN``, ``--token-file``, ``token=``);
2. keys: first those named with ``-i`` or in the config file, then the keys ssh-agent holds,
   then the default key files ``~/.ssh/id_ed25519``, ``id_ecdsa``, ``id_rsa``. Each of these three
   stages is one message carrying a signature per key, so one round trip tries them all. A key
   file protected by a passphrase is first offered unsigned (a query): only a key the server
   would accept is worth asking its passphrase for;
3. a password (given, or asked up to three times on a terminal).

:func:`log_in` drives this over a narrow :class:`Exchange` (send a message, receive one), so the
connection code does not know the methods and this module does not know sockets. Key files need
``cryptography`` and an agent does not: :mod:`ferry.sshkeys` is imported only when a key file is
actually used, so password and agent logins do not pay for it.
"""

from __future__ import annotations

import base64
import os
import secrets
import stat
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Final, Protocol

from ferry.errors import AuthError, ConnectionBroken, UsageError
from ferry.errtext import os_reason
from ferry.wire import messages as m
from ferry.wire.auth import key_fingerprint, key_transcript, read_ssh_string
from ferry.wire.codes import ErrorCode, from_wire

if TYPE_CHECKING:
    from ferry.sshkeys import PrivateKey

__all__ = [
    "DEFAULT_KEY_FILES",
    "Exchange",
    "LoginOptions",
    "LoginResult",
    "NeedReconnect",
    "log_in",
    "read_secret_file",
]

#: Key files tried when nothing else worked, as ssh does (relative to the home folder).
DEFAULT_KEY_FILES: Final = (".ssh/id_ed25519", ".ssh/id_ecdsa", ".ssh/id_rsa")
#: Password prompts on a terminal before giving up (as ssh's NumberOfPasswordPrompts).
PASSWORD_TRIES: Final = 3


class Exchange(Protocol):
    """The handshake's side of the connection: send one message, receive the next."""

    async def send(self, msg: m.Message) -> None:
        """Send ``msg``."""

    async def receive(self) -> m.Message:
        """The next message from the server (pings are answered by the caller)."""


@dataclass
class LoginOptions:
    """What a client may log in with; see the module docstring for the order they are tried in.

    ``ask_password(prompt)`` and ``ask_passphrase(prompt)`` are called (on a terminal) when a
    password or a key passphrase is needed; return None to skip. Without them nothing is asked.
    """

    password: str | None = None
    token: str | None = None
    #: key files named by the user (-i, the config file, key=): tried first, a passphrase is asked
    identities: Sequence[str | os.PathLike[str]] = ()
    #: True: the agent at $SSH_AUTH_SOCK; a str: that socket; False: no agent
    agent: bool | str = False
    #: also try ~/.ssh/id_ed25519, id_ecdsa, id_rsa
    default_keys: bool = False
    passphrase: str | None = None
    ask_password: Callable[[str], str | None] | None = None
    ask_passphrase: Callable[[str], str | None] | None = None
    #: called with a one-line note for the user (a skipped key file, a method that failed)
    notice: Callable[[str], None] | None = None
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    #: every note of the last login (also when there is no ``notice``): the final error cites them
    notes: list[str] = field(default_factory=list)

    def _note(self, text: str) -> None:
        self.notes.append(text)
        if self.notice is not None:
            self.notice(text)


@dataclass(frozen=True)
class LoginResult:
    """How the login succeeded: ``method`` (password, key, token) and a phrase for ``-v``."""

    ok: m.AuthOk
    method: str
    detail: str


class NeedReconnect(Exception):
    """The server closed the connection while the user was typing (its login deadline passed):
    the caller connects again and calls :func:`log_in` with ``typed_password``."""

    def __init__(self, password: str) -> None:
        super().__init__("connection closed during the password prompt")
        self.password = password


def read_secret_file(path: str | os.PathLike[str], what: str, option: str) -> str:
    """The first line of a password or token file (``option`` names it in messages), refused when
    others may read or change it (as ssh refuses a private key file that others can read: the
    secret is no longer one)."""
    try:
        with open(path, encoding="utf-8") as f:
            mode = os.fstat(f.fileno()).st_mode
            text = f.read()
    except OSError as exc:
        raise UsageError(f"cannot read a {what} from {option} {path}: {os_reason(exc)}") from exc
    except UnicodeDecodeError as exc:
        raise UsageError(f"cannot read a {what} from {option} {path}: not UTF-8 text") from exc
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise UsageError(
            f"refusing {option} {path}: its mode {stat.S_IMODE(mode):04o} lets other users read "
            f"or change it; run 'chmod 600 {path}'"
        )
    lines = text.splitlines()
    if not lines or not lines[0]:
        raise UsageError(f"{option} {path} is empty: put the {what} on its first line")
    return lines[0]


# --- key files ---------------------------------------------------------------------------------


@dataclass
class _KeyFile:
    """A private key file: its public blob (read without the passphrase when possible)."""

    path: Path
    data: bytes
    blob: bytes | None
    encrypted: bool
    loaded: PrivateKey | None = None


def _openssh_header(data: bytes) -> tuple[bytes, bool] | None:
    """(public blob, encrypted) from an OpenSSH private key file without decrypting it: the format
    keeps the public key in clear (PROTOCOL.key in OpenSSH's sources)."""
    text = data.decode("ascii", "replace")
    begin, end = "-----BEGIN OPENSSH PRIVATE KEY-----", "-----END OPENSSH PRIVATE KEY-----"
    if begin not in text or end not in text:
        return None
    try:
        raw = base64.b64decode("".join(text.split(begin, 1)[1].split(end, 1)[0].split()))
        magic = b"openssh-key-v1\0"
        if not raw.startswith(magic):
            return None
        cipher, pos = read_ssh_string(raw, len(magic))
        _kdf, pos = read_ssh_string(raw, pos)
        _kdf_options, pos = read_ssh_string(raw, pos)
        if int.from_bytes(raw[pos : pos + 4], "big") != 1:
            return None
        blob, _ = read_ssh_string(raw, pos + 4)
    except ValueError:
        return None
    return blob, cipher != b"none"


def _read_key_file(path: Path, opts: LoginOptions, *, named: bool) -> _KeyFile | None:
    """Read ``path`` (None, with a note when ``named``, if it cannot be used)."""
    try:
        with open(path, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            data = f.read(1 << 20)
    except OSError as exc:
        if named:
            raise UsageError(f"cannot read the key file {path}: {exc.strerror or exc}") from exc
        return None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        # As ssh: a private key others can read is no longer private; do not use it.
        opts._note(
            f"ignoring the key file {path}: its mode {stat.S_IMODE(mode):04o} lets other users read it "
            f"(run 'chmod 600 {path}')"
        )
        return None
    header = _openssh_header(data)
    if header is not None:
        return _KeyFile(path, data, header[0], header[1])
    encrypted = b"ENCRYPTED" in data[:4096]
    blob = None
    pub = path.with_name(path.name + ".pub")
    try:
        fields = pub.read_text(encoding="ascii").split()
        blob = base64.b64decode(fields[1], validate=True)
    except (OSError, ValueError, IndexError, UnicodeDecodeError):
        blob = None
    return _KeyFile(path, data, blob, encrypted)


def _load(key: _KeyFile, passphrase: str | None) -> PrivateKey:
    from ferry.sshkeys import load_private_key

    return load_private_key(key.data, None if passphrase is None else passphrase.encode(), name=str(key.path))


def _unlock(key: _KeyFile, opts: LoginOptions) -> PrivateKey | None:
    """The private key, asking for its passphrase (up to three times) when it has one."""
    from ferry.sshkeys import KeyError_

    if not key.encrypted:
        try:
            return _load(key, None)
        except KeyError_ as exc:
            opts._note(f"ignoring {key.path}: {exc}")
            return None
    if opts.passphrase is not None:
        try:
            return _load(key, opts.passphrase)
        except KeyError_:
            if opts.ask_passphrase is None:
                opts._note(f"the passphrase given for {key.path} is wrong")
                return None
    if opts.ask_passphrase is None:
        opts._note(f"skipping {key.path}: it needs a passphrase and none can be asked here")
        return None
    for _ in range(PASSWORD_TRIES):
        typed = opts.ask_passphrase(f"Enter passphrase for key '{key.path}': ")
        if not typed:
            return None
        try:
            return _load(key, typed)
        except KeyError_ as exc:
            opts._note(str(exc))
    return None


# --- the login ---------------------------------------------------------------------------------


@dataclass
class _Signer:
    """One key of a stage: where it comes from, its blob, and how to sign with it."""

    blob: bytes
    source: str  # for -v: "ssh-agent", or the file's path
    file: _KeyFile | None = None
    agent_key: object = None

    def algorithm(self) -> str:
        name = read_ssh_string(self.blob, 0)[0].decode("ascii", "replace")
        return "rsa-sha2-512" if name == "ssh-rsa" else name


class _Login:
    def __init__(
        self, exchange: Exchange, welcome: m.Welcome, user: str, opts: LoginOptions, fingerprint: str
    ) -> None:
        self.x = exchange
        self.welcome = welcome
        self.user = user
        self.opts = opts
        self.fingerprint = fingerprint
        self.tried: set[bytes] = set()
        self.errors: list[str] = []

    def transcript(self, client_nonce: bytes, blob: bytes, algorithm: str) -> bytes:
        return key_transcript(
            version=self.welcome.version,
            server_nonce=self.welcome.nonce,
            client_nonce=client_nonce,
            user=self.user,
            server_fingerprint=self.fingerprint,
            public_key=blob,
            algorithm=algorithm,
        )

    async def _reply(self) -> m.Message:
        reply = await self.x.receive()
        if isinstance(reply, m.Goodbye):  # e.g. the server's login deadline passed
            raise ConnectionBroken(f"the server closed the connection: {reply.reason or 'goodbye'}")
        if isinstance(reply, m.Error) and reply.code != ErrorCode.AUTH:
            raise from_wire(reply)
        return reply

    async def token(self, token: str) -> LoginResult | None:
        await self.x.send(m.AuthToken(token=token, user=self.user))
        reply = await self._reply()
        if isinstance(reply, m.AuthOk):
            return LoginResult(reply, "token", f"token {reply.key_id}")
        assert isinstance(reply, m.Error)
        self._failed("token", reply.message)
        return None

    def _failed(self, method: str, message: str) -> None:
        self.errors.append(f"{method}: {message}")
        if "too many failed logins" in message:
            raise AuthError(f"login as {self.user!r} refused: {message}")

    async def keys(
        self, signers: list[_Signer], sign: Callable[[_Signer, bytes], Awaitable[bytes | None]]
    ) -> LoginResult | None:
        """Offer ``signers`` signed, in one message; ``sign`` makes a signature (None: skip the key)."""
        fresh = [s for s in signers if s.blob not in self.tried][: m.MAX_KEY_OFFERS]
        if not fresh:
            return None
        client_nonce = secrets.token_bytes(32)
        offers = []
        used = []
        for signer in fresh:
            self.tried.add(signer.blob)
            signature = await sign(signer, self.transcript(client_nonce, signer.blob, signer.algorithm()))
            if signature:
                offers.append(m.KeyOffer(public_key=signer.blob, signature=signature))
                used.append(signer)
        if not offers:
            return None
        await self.x.send(m.AuthKey(user=self.user, client_nonce=client_nonce, offers=offers))
        reply = await self._reply()
        if isinstance(reply, m.AuthOk):
            source = next((s.source for s in used if key_fingerprint(s.blob) == reply.key_id), "a key")
            return LoginResult(reply, "key", f"key {reply.key_id} ({source})")
        if isinstance(reply, m.Error):
            self._failed("keys", reply.message)
        return None

    async def query(self, files: list[_KeyFile]) -> list[_KeyFile]:
        """Which of the passphrase-protected ``files`` the server would accept (one question)."""
        files = [f for f in files if f.blob is not None and f.blob not in self.tried][: m.MAX_KEY_OFFERS]
        if not files:
            return []
        offers = [m.KeyOffer(public_key=f.blob) for f in files if f.blob is not None]
        await self.x.send(m.AuthKey(user=self.user, client_nonce=secrets.token_bytes(32), offers=offers))
        reply = await self._reply()
        if isinstance(reply, m.AuthKeyOk):
            return [files[i] for i in reply.accepted if i < len(files)]
        return []

    async def password(self, password: str) -> LoginResult | None:
        await self.x.send(m.Auth(user=self.user, password=password))
        reply = await self._reply()
        if isinstance(reply, m.AuthOk):
            return LoginResult(reply, "password", "password")
        assert isinstance(reply, m.Error)
        self._failed("password", reply.message)
        return None


async def _sign_file(signer: _Signer, data: bytes) -> bytes | None:
    assert signer.file is not None and signer.file.loaded is not None
    return signer.file.loaded.sign(data, signer.algorithm())


async def _key_stages(login: _Login, opts: LoginOptions) -> LoginResult | None:
    """Named key files, then the agent's keys, then the default key files; then passphrases."""
    locked: list[_KeyFile] = []

    def file_signers(files: list[_KeyFile]) -> list[_Signer]:
        signers = []
        for f in files:
            if f.blob is not None and f.blob in login.tried:
                continue
            if f.encrypted and opts.passphrase is None:
                locked.append(f)
                continue
            f.loaded = _unlock(f, opts)
            if f.loaded is not None:
                signers.append(_Signer(f.loaded.public.blob, str(f.path), f))
        return signers

    named = [k for p in opts.identities if (k := _read_key_file(Path(p).expanduser(), opts, named=True))]
    if (result := await login.keys(file_signers(named), _sign_file)) is not None:
        return result
    if opts.agent:
        result = await _agent_stage(login, opts)
        if result is not None:
            return result
    if opts.default_keys:
        home = Path(opts.env.get("HOME") or Path.home())
        defaults = [k for rel in DEFAULT_KEY_FILES if (k := _read_key_file(home / rel, opts, named=False))]
        if (result := await login.keys(file_signers(defaults), _sign_file)) is not None:
            return result
    if not locked or (opts.ask_passphrase is None and opts.passphrase is None):
        for f in locked:
            opts._note(f"skipping {f.path}: it needs a passphrase and none can be asked here")
        return None
    for f in await login.query(locked):
        f.loaded = _unlock(f, opts)
        if f.loaded is not None:
            f_signer = _Signer(f.loaded.public.blob, str(f.path), f)
            login.tried.discard(f_signer.blob)
            if (result := await login.keys([f_signer], _sign_file)) is not None:
                return result
    return None


async def _agent_stage(login: _Login, opts: LoginOptions) -> LoginResult | None:
    from ferry.client.agent import Agent, AgentError, AgentKey, agent_socket

    path = opts.agent if isinstance(opts.agent, str) else agent_socket(opts.env)
    if path is None:
        return None
    try:
        async with Agent(path) as agent:
            keys = await agent.keys()

            async def sign(signer: _Signer, data: bytes) -> bytes | None:
                assert isinstance(signer.agent_key, AgentKey)
                try:
                    return await agent.sign(signer.agent_key, data)
                except AgentError as exc:
                    opts._note(str(exc))
                    return None

            signers = [_Signer(k.blob, "ssh-agent", agent_key=k) for k in keys]
            return await login.keys(signers, sign)
    except AgentError as exc:
        opts._note(str(exc))
        return None


async def log_in(
    exchange: Exchange,
    welcome: m.Welcome,
    user: str,
    opts: LoginOptions,
    *,
    fingerprint: str | None,
    typed_password: str | None = None,
) -> LoginResult:
    """Log in as ``user`` with what ``opts`` allows, in the documented order.

    ``fingerprint`` is the pinned certificate's (None on --plain); ``typed_password`` is a password
    the user typed before a :class:`NeedReconnect`: sent at once, nothing else is tried again.
    Raises :class:`~ferry.errors.AuthError` when every method failed (saying which were tried).
    """
    opts.notes.clear()
    login = _Login(exchange, welcome, user, opts, fingerprint or "")
    modern = welcome.version >= m.KEY_LOGIN_VERSION and bool(welcome.nonce)
    if typed_password is None:
        if not modern and (opts.token or opts.identities):
            opts._note(
                f"the server speaks protocol {welcome.version}, which has no key or token login; "
                "only a password can be used"
            )
        if modern and opts.token and (result := await login.token(opts.token)) is not None:
            return result
        if (
            modern
            and (opts.identities or opts.agent or opts.default_keys)
            and (result := await _key_stages(login, opts)) is not None
        ):
            return result
    tries = PASSWORD_TRIES
    if typed_password is not None:  # typed before the server closed the connection: send it now
        if (result := await login.password(typed_password)) is not None:
            return result
        tries -= 1
    elif opts.password is not None:  # given (FERRY_PASSWORD, a file, password=): not asked again
        if (result := await login.password(opts.password)) is not None:
            return result
        raise AuthError(f"login as {user!r} refused: wrong user name or password")
    if opts.ask_password is None:
        tried = "; ".join(login.errors + opts.notes) or "no credential was available"
        raise AuthError(
            f"login as {user!r} failed ({tried}); give a password (FERRY_PASSWORD, --password-file, "
            "a terminal), a key (-i FILE, ssh-agent) or a token (FERRY_TOKEN, --token-file)"
        )
    for _ in range(tries):
        typed = opts.ask_password(f"{user} password: ")
        if typed is None:
            break
        try:
            result = await login.password(typed)
        except ConnectionBroken as exc:  # the server's login deadline passed while we waited
            raise NeedReconnect(typed) from exc
        if result is not None:
            opts.password = typed  # a reconnect of the same client (ferry shell) does not ask again
            return result
    raise AuthError(f"login as {user!r} refused: wrong user name or password")
