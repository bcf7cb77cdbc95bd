"""The firmware bridge: sensor MCUs on a serial link.

Public API: ``cobs`` (encode/decode), ``frames`` (``MsgType``, ``Message``, body codec),
``link.Link`` (sans-IO link: ``receive_data``/``next_event``/``send``), ``bridge.Bridge`` /
``BridgeConfig`` (pyserial adapter on asyncio), ``simulator.MCUSimulator`` (reference MCU over a pty).
"""
