"""Training and inference for the Qwen-Image family of diffusion models."""

__version__ = "0.1.0"

import logging as _logging

# bitsandbytes is imported by peft (which diffusers imports) whenever both are installed, and on the CPU it warns at
# every start that it cannot fetch its optional kernels from the Hub: noise for every command, even --help. Its real
# problems (an 8-bit optimizer that cannot run) still surface as errors where --optimizer_type adamw8bit is used.
for _name in ("bitsandbytes", "kernels"):
    _logging.getLogger(_name).setLevel(_logging.ERROR)
