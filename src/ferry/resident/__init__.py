"""The resident client connection (what OpenSSH users know as ControlMaster/ControlPersist).

A background process holds one logged-in connection to a server and runs later ``ferry``
commands for that destination over a private Unix socket, so they skip the interpreter's heavy
imports, TCP, TLS and the login. docs/cli.md ("The resident connection") describes it for users.

Modules, lightest first (the thin path of every command imports only the first two):

* :mod:`ferry.resident.runtime`: the per-user runtime folder, socket names, the request frame,
  peer credentials; standard library only, no ``typing``, ``re`` or ``pathlib``;
* :mod:`ferry.resident.thin`: the console script's entry: hands a command to a resident process
  when one is there, else runs the command line as before;
* :mod:`ferry.resident.context`: the hook through which the command line's code runs its
  coroutine on the resident's loop and gets the resident's client;
* :mod:`ferry.resident.spawn`: starting a resident process after a direct command logged in;
* :mod:`ferry.resident.daemon`: the resident process itself (``python -m ferry.resident``).
"""
