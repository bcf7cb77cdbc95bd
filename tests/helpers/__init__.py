"""Plain helpers for the tests (no fixtures here: those live in the conftest.py files).

- ``broker``: free ports and a real Mosquitto process.
- ``fleet``: agent / controller / fleetctl subprocesses and agent configs.
- ``waiting``: wait on a condition (``wait_for``, async ``until``) and the MQTT ``Probe``.
- ``bundles``: example bundles built once per build parameters and code, cached on disk.
- ``serial``: a real pty pair and the bridge's run loop for the firmware-bridge tests.
"""
