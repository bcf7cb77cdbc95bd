"""The wire contract both sides import.

Pure modules (no I/O): ``topics`` (topic tree, id validation), ``envelope`` (JSON
envelope codec), ``binary`` (tensor/chunk frames), ``config_loader``.
The single network edge is ``mqttlink`` (paho → asyncio), imported only by daemons.
"""
from .topics import SCHEMA_VERSION, Topics, validate_id, InvalidId  # noqa: F401
from .envelope import Envelope, DecodeError, decode, encode  # noqa: F401
from . import fl as _fl  # noqa: F401,E402 - registers the fl.* message kinds with the envelope codec
from . import offload as _offload  # noqa: F401,E402 - registers the offload.* message kinds
