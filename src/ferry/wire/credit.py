"""Flow-control credit: how much one side may still send on one stream, written once.

The receiver of a stream grants the sender credit (the first grant comes with the request or its
answer, the next ones in :class:`~ferry.wire.messages.Window` messages, or in acknowledgements);
the sender spends it and stops at zero. So what is in flight, and what the receiver must buffer,
is bounded by the window, whatever the two sides' speeds.

One :class:`Credit` per stream and direction, on *both* sides, counting the same number:

* the **sender** calls :meth:`take` before sending (it gets at most what is left) and
  :meth:`grant` when the receiver grants more;
* the **receiver** calls :meth:`receive` for what arrives (more than was granted is the peer's
  protocol error) and :meth:`consumed` once its consumer has taken it: that returns the increment
  to grant back, batched to half a window so a busy stream costs one message per half window.

Units are the caller's: bytes for command input and output, batches for tree uploads. Used by
remote commands on both sides (stdin, stdout, stderr) and by the client's tree uploads (batches
not yet acknowledged). Pure bookkeeping: waiting for credit is the caller's business.
"""

from __future__ import annotations

from ferry.wire.errors import LocalProtocolError, RemoteProtocolError

__all__ = ["MAX_CREDIT", "Credit"]


#: The most credit a peer can hand out (a U64 on the wire); more is a protocol error.
MAX_CREDIT = (1 << 63) - 1


class Credit:
    """The credit of one stream in one direction (see the module documentation).

    ``window`` is the receiver's fixed window: the most that may ever be outstanding, so a grant
    beyond it (credit for something never received) is the peer's protocol error. A sender whose
    receiver may grow the window (or whose window it does not know) passes ``window=None``.
    ``available`` starts at ``initial`` (default: the whole window).
    """

    def __init__(self, window: int | None, *, initial: int | None = None) -> None:
        if window is not None and window < 0:
            raise ValueError("a window cannot be negative")
        self.window = window
        #: units the sender may still send (granted and not yet sent)
        self.available = initial if initial is not None else (window or 0)
        self._unreturned = 0  # receiver: consumed, not granted back yet

    def __repr__(self) -> str:
        return f"Credit(window={self.window}, available={self.available})"

    # --- the sender ----------------------------------------------------------------------------

    def take(self, want: int) -> int:
        """Spend up to ``want`` units; returns how many may be sent now (0: wait for a grant)."""
        n = min(want, self.available)
        self.available -= n
        return n

    def spend(self, n: int) -> None:
        """Spend exactly ``n`` units (sending more than the credit would be our protocol error)."""
        if n > self.available:
            raise LocalProtocolError(f"sending {n} with only {self.available} of credit")
        self.available -= n

    def grant(self, n: int) -> None:
        """The receiver granted ``n`` more units. Raises :class:`RemoteProtocolError` for a grant
        that is not positive or that would exceed the receiver's own window (credit for data it
        never received back)."""
        if n <= 0:
            raise RemoteProtocolError(f"a window grant of {n}")
        if self.available + n > (MAX_CREDIT if self.window is None else self.window):
            raise RemoteProtocolError(
                f"the peer granted {n} more with {self.available} of a {self.window} window left"
            )
        self.available += n

    # --- the receiver --------------------------------------------------------------------------

    def receive(self, n: int) -> None:
        """``n`` units arrived; more than was granted is the peer's :class:`RemoteProtocolError`."""
        if n > self.available:
            raise RemoteProtocolError(f"the peer sent {n} with only {self.available} of its window left")
        self.available -= n

    def consumed(self, n: int) -> int:
        """``n`` received units were consumed; returns how many to grant back now (0: not yet).

        Grants go back in batches of at least half the window (one message per half window, not
        one per piece); the returned amount is added to :attr:`available` at once.
        """
        self._unreturned += n
        if self._unreturned < max(1, (self.window or 0) // 2):
            return 0
        inc, self._unreturned = self._unreturned, 0
        self.available += inc
        return inc
