"""The core: what events mean and what follows from them, with no I/O.

Framing (netstrings, RESP), the events and commands, the protocol object,
the engine (time passed in) and the values they share. Nothing here
imports Trio, opens a file or a socket, or reads a clock: the adapters
around it (the package's other modules) do, and feed it.
"""
