"""musubi-tuner's companion tools for Qwen-Image: post-hoc EMA of LoRA checkpoints, merging LoRAs into a DiT,
extracting a LoRA from a full finetune, captioning with Qwen2.5-VL."""
