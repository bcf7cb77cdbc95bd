"""The firmware bridge: sensor MCUs on a serial link.

Public API: ``cobs`` (encode/decode), ``frames`` (``MsgType``, ``Message``, body codec),
``link.Link`` (sans-IO link: ``receive_data``/``next_event``/``send``), ``push.ModelPush`` /
``push.ModelReceiver`` (sans-IO model push, agent and MCU sides; ``PushResult``),
``bridge.Bridge`` / ``BridgeConfig`` (pyserial adapter on asyncio; ``Bridge.push`` drives a push),
``simulator.MCUSimulator`` (reference MCU over a pty). The agent's wiring is ``agent.mcu``.
"""
