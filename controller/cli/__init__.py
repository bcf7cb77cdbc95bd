"""``fleetctl``: the click command tree.

Public API: ``main`` (the ``fleetctl`` console script) and ``cli`` (the root click group,
for tests that drive it with ``CliRunner``). One module per command group; ``app.py``
registers each with an explicit ``cli.add_command``; shared parameter types are in
``params.py``.
"""
from .app import cli, main

__all__ = ["cli", "main"]
