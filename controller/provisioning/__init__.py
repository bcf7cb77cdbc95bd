"""Provisioning by claim: the claims store, the dynamic-security client, the accept policy and
the engine that issues a board its own certificate and broker identity (docs/provisioning.md)."""
