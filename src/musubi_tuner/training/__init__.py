"""The trainer loop shared by LoRA and full finetuning, and its parts."""
