"""The board's own identity: claim it once with the fleet-wide claim credential (claim.py),
then renew it before it expires (rotation.py). docs/provisioning.md."""
