"""The request services of the object backend (``ferry serve --store s3://... --db postgresql://...``).

Each answers the same messages as its folder-backend twin in :mod:`ferry.server` (files, transfer,
tree, sync, delta) with the same replies, through the server's one
:class:`~ferry.store.objects.ObjectStorage` (chunks in S3, namespace in PostgreSQL) instead of a jail
over a folder. The session picks this set when its storage is an object storage
(:meth:`ferry.server.context.ServerContext.open_storage`). Remote commands are never served here:
there is no folder to run them in.

:data:`OBJECT_MESSAGES` are the file requests a session answers with a clear ``invalid`` error when no
object service declares them (so a request the backend does not serve fails at once, never hangs).
"""

from __future__ import annotations

from typing import Any

from ferry.server.objectsvc.delta import ObjectDeltaService
from ferry.server.objectsvc.files import ObjectFilesService
from ferry.server.objectsvc.sync import ObjectSyncService
from ferry.server.objectsvc.transfer import ObjectTransferService
from ferry.server.objectsvc.tree import ObjectTreeService
from ferry.server.service import Service
from ferry.wire import messages as m

#: The services of a session on the object backend.
OBJECT_SERVICES: tuple[type[Service[Any]], ...] = (
    ObjectFilesService,
    ObjectTransferService,
    ObjectTreeService,
    ObjectSyncService,
    ObjectDeltaService,
)

#: Every file request: those no service in :data:`OBJECT_SERVICES` declares are refused as unsupported.
OBJECT_MESSAGES: tuple[type[m.Message], ...] = (
    m.GetFile,
    m.PutFile,
    m.PutFrom,
    m.FileEnd,
    m.GetTree,
    m.PutTree,
    m.TreeItems,
    m.ScanTree,
    m.GetFiles,
    m.RemoveMany,
    m.SetAttrs,
    m.GetChunks,
    m.DeltaPut,
    m.DeltaData,
    m.DeltaGet,
    m.Chunks,
)
