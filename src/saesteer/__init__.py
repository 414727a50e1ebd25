"""saesteer: steer a chat LLM's refusal behaviour with sparse-autoencoder features."""

__version__ = "0.1.0"
