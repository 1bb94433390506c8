"""Backends that run, and lower to, what the passes produce (installed as `xopt.backends`)."""
