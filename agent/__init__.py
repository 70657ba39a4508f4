"""studio-agent: a runner for StudioML experiments."""

__version__ = "0.1.0"
