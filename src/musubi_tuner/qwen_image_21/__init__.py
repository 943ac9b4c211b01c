"""The Qwen-Image-2.1 family: its own DiT, 16x VAE and Qwen3-VL text encoder (modeling.py), its generation rules
(generation.py) and the family object (family.py)."""
