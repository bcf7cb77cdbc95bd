"""Model rollouts: canary waves, health gates, signed offers and chunked transfers.

* ``policy`` – decides: ``RolloutPolicy``, ``plan_waves`` and the pure ``decide`` table;
* ``store``  – the artifacts', rollouts', slots', desired versions' and tags' SQL (``RolloutStore``);
* ``runner`` – acts inside ``fleetctl serve``: releases waves, offers, serves chunks.
"""
