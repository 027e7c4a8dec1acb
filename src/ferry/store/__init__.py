"""The object backend's storage: file contents as chunk objects in an S3 store, the namespace in PostgreSQL.

One namespace served by N ferry servers (docs/scale-out.md). The modules, bottom up:

* :mod:`ferry.store.api` — the storage interface the server stands on (a ``typing.Protocol``) and its
  value types; the folder backend and the object backend both implement it;
* what a store can fail with are :class:`ferry.errors.FerryError` subclasses with codes from the
  registry (:class:`ferry.wire.codes.ErrorCode`: ``unavailable``, ``corrupt``, ``upload-gone``,
  ``incomplete``, and the jail's codes);
* :mod:`ferry.store.config` — ``--store s3://BUCKET/PREFIX``, the endpoint and credentials, parsed and
  checked (no S3 client imported);
* :mod:`ferry.store.chunks` — content-addressed chunk objects in an S3-compatible store (obstore);
* :mod:`ferry.store.schema` — the PostgreSQL schema and its migrations;
* :mod:`ferry.store.namespace` — folders, files, chunk lists, partial uploads, usage, in PostgreSQL
  (asyncpg), and the database half of the chunk sweeper;
* :mod:`ferry.store.objects` — :class:`~ferry.store.objects.ObjectStorage`, the two joined behind the
  interface, with the sweeper that gives space back.

Nothing here imports ``ferry.server``: the server imports this package (and only when
``--store`` asks for the object backend, so obstore and asyncpg stay optional: ``ferry[scale]``).
"""
