"""The service distribution's commands (``agentrun dev``, ``server``, ``worker``) and the local dev stack."""
