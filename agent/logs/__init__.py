"""The board's own log, readable remotely: a bounded ring (ring.py) served and streamed on
request (feature.py), rate-limited for cellular links."""
