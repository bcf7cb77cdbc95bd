"""edge-agent: the daemon on each board.

Public API: ``Agent`` (agent.daemon), ``AgentConfig``/``load_config`` (agent.config).
"""
__version__ = "0.1.0"
