"""Image generation for every model family: prompt files and specs, one pipeline (pipeline.py) that each family fills
in (its jobs, prompt encoder, conditions and denoising), saving, the --interactive console, and the settings a DiT
file recommends."""
