"""Attention Sink Lab: one LLaMA-style model for every variant of Gu et al. (ICLR 2025)."""
from lit_gpt.config import CHOICES, Config, ConfigError, NAMED_CONFIGS
from lit_gpt.model import GPT, Analysis

__all__ = ["CHOICES", "Config", "ConfigError", "NAMED_CONFIGS", "GPT", "Analysis"]
