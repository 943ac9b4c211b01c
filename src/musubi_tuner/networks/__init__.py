"""LoRA networks for the Qwen-Image DiT and LoRA file formats."""
