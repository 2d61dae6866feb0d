"""The layer that wires the registry, the stages and the library for the CLI."""
