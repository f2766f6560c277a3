"""slime_rl: high-throughput reinforcement-learning post-training for LLMs."""

__version__ = "0.1.0"
