"""vlalign: preference alignment of LLaVA-style vision-language models (SFT, reward model, DPO, PPO)."""

__version__ = "0.1.0"
