"""Qwen-Image family specifics: versions, loaders, text encoding, latents and the sampler."""
