"""tinyrl: Memory-R+ reinforcement learning for small language models on one small GPU."""

__version__ = "0.1.0"
