"""edge-agent: the daemon on each board.

Public API: ``Agent`` (agent.app: the lifecycle, the link, the composed features),
``AgentContext``/``Feature``/``CommandError`` (agent.core.context: what a feature is handed and
declares), ``AgentConfig``/``load_config`` (agent.core.config).

Layout, one package per capability: ``core/`` (context, config, outbox, counters, systemd,
Home Assistant), ``serving/`` (engine, runtimes, sources, results, health gate), ``offload/``,
``updates/`` (transfer, model store, the update state table), ``learning/`` (on-device training,
federated participant), ``mcu/`` (the sensor MCU on a serial port).
"""
__version__ = "0.1.0"
