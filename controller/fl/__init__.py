"""Federated learning on the controller, in Flower's layers.

* ``aggregate``  – computes: plain numpy functions over arrays and weights;
* ``strategies`` – decides: configure a round, aggregate results (``make(name, **params)``);
* ``privacy``    – DP clipping, noise and accounting;
* ``selection``  – which devices join a round and how many steps each trains;
* ``engine``     – the round state machine (``RoundEngine``, ``RunConfig``), no I/O;
* ``store``      – the runs', rounds' and updates' SQL (``RoundStore``);
* ``runner``     – acts: sends tasks and heads, takes updates, inside ``fleetctl serve``.
"""
