"""knowstack: add new knowledge to an LLM round after round, and measure what it costs."""

__version__ = "0.1.0"
