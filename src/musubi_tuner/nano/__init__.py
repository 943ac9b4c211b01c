"""The nano Qwen-Image family: the real architectures at a size that trains and runs on a CPU, trained on the shapes
world, with a deterministic judge that reads what a picture shows. `python -m musubi_tuner.nano build` rebuilds
every shipped file; `musubi_tuner.nano.models` finds them."""
