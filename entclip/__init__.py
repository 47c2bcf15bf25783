"""entclip: GRPO with entropy-discriminator clipping and instruments for entropy dynamics."""

__version__ = "0.1.0"
