"""`pyrycode-relay bench`: load generation and measurement against relays on loopback.

Owns: the scenarios (closed, open, idle), the soak leak check and the memory measurement, the
servers they start and the figures they read (cli.py routes each subcommand).
Must never: be imported by serving code, target a non-loopback address, or leave a process it
started running.
"""
