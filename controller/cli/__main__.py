"""``python -m controller.cli``: the same as ``fleetctl``."""
from . import main

main()
