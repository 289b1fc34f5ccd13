"""nhcheck: audit Nemotron-H checkpoints against an exact replay of the engine's weight loader."""

__version__ = "0.1.0"
