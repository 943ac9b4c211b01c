"""LoRA mode of the trainer: any kohya-style network module over the frozen DiT."""

from __future__ import annotations

import importlib
import inspect
import json
import logging
from pathlib import Path

import torch

from ..errors import UserError, describe_error
from .optim import parse_kv
from .trainer import Mode

logger = logging.getLogger(__name__)


def import_network_module(name: str):
    """`networks.lora_qwen_image` (the documented spelling) resolves to this package's module; any other import
    path (e.g. `lycoris.kohya`) is imported as given."""
    candidates = [f"musubi_tuner.{name}", name] if name.startswith("networks.") else [name]
    for c in candidates:
        try:
            return importlib.import_module(c)
        except ModuleNotFoundError as e:
            if not c.startswith(e.name or "\0") and e.name not in c:
                raise UserError(f"--network_module {name}: it needs the package {e.name!r}, which is not installed "
                                f"(pip install {e.name.split('.')[0]})") from None
        except Exception as e:  # noqa: BLE001 - a broken third-party module is the user's to fix
            raise UserError(f"--network_module {name}: importing it failed ({describe_error(e)})") from None
    raise UserError(f"--network_module {name}: module not found (use networks.lora_qwen_image or an installed "
                    "module path such as lycoris.kohya)")


def _call(fn, **kwargs):
    """Call with the keyword arguments fn accepts (kohya modules differ in their signatures)."""
    sig = inspect.signature(fn)
    if any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values()):
        return fn(**kwargs)
    return fn(**{k: v for k, v in kwargs.items() if k in sig.parameters})


def network_kwargs(args) -> dict[str, str]:
    """--network_args as the strings kohya network modules receive."""
    return {k: str(v) for k, v in parse_kv(args.network_args, "--network_args").items()}


class LoraMode(Mode):
    name = "lora"
    script = "qwen_image_train_network.py"

    def validate(self, args, version) -> None:
        from ..qwen_image.model_files import expect

        if args.network_dim < 1:
            raise UserError(f"--network_dim {args.network_dim} must be at least 1")
        if args.network_alpha is not None and args.network_alpha < 0:
            raise UserError(f"--network_alpha {args.network_alpha} must be >= 0 (0 means the rank: scale 1)")
        if args.network_dropout is not None and not 0 <= args.network_dropout < 1:
            raise UserError(f"--network_dropout {args.network_dropout} must be in [0, 1)")
        if args.network_weights:
            expect(args.network_weights, "--network_weights", "lora", version)
        module = import_network_module(args.network_module)
        if not (hasattr(module, "create_arch_network") or hasattr(module, "create_network")):
            raise UserError(f"--network_module {args.network_module} is not a network module (it has no "
                            "create_network); use networks.lora_qwen_image, networks.loha, networks.lokr or a "
                            "kohya-style module such as lycoris.kohya")
        kwargs = network_kwargs(args)
        if hasattr(module, "check_network_args"):
            module.check_network_args(kwargs)

    def resume_settings(self, args) -> dict:
        return {"--network_module": args.network_module}

    def __init__(self):
        self.network = None
        self.metadata: dict[str, str] = {}

    def dit_dtype(self, args) -> torch.dtype:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.mixed_precision, torch.float32)

    def setup(self, transformer, args) -> list[dict]:
        transformer.requires_grad_(False)  # --base_weights were merged while the DiT loaded (placement)
        module = import_network_module(args.network_module)
        net_kwargs = network_kwargs(args)
        if args.network_weights and hasattr(module, "create_network_from_weights") and args.dim_from_weights:
            self.network = _call(module.create_network_from_weights, multiplier=1.0, file=args.network_weights,
                                 vae=None, text_encoders=None, unet=transformer, text_encoder=None, **net_kwargs)
        else:
            create = getattr(module, "create_arch_network", None) or module.create_network
            self.network = _call(create, multiplier=1.0, network_dim=args.network_dim, network_alpha=args.network_alpha,
                                 vae=None, text_encoders=None, text_encoder=None, unet=transformer,
                                 neuron_dropout=args.network_dropout, **net_kwargs)
        if self.network is None:
            raise UserError(f"--network_module {args.network_module}: create_network returned None")
        _call(self.network.apply_to, text_encoders=None, text_encoder=None, unet=transformer,
              apply_text_encoder=False, apply_unet=True)
        if args.network_weights and not args.dim_from_weights:
            info = self.network.load_weights(args.network_weights)
            logger.info("continuing from %s: %s", args.network_weights, info)
        self.network.to(transformer.device)
        if hasattr(self.network, "prepare_grad_etc"):
            _call(self.network.prepare_grad_etc, text_encoder=None, unet=transformer)
        self.network.requires_grad_(True)
        result = _call(self.network.prepare_optimizer_params, unet_lr=args.learning_rate,
                       text_encoder_lr=None, learning_rate=args.learning_rate)
        groups = result[0] if isinstance(result, tuple) else result
        groups = [g if isinstance(g, dict) else {"params": list(g)} for g in groups]
        n = sum(p.numel() for g in groups for p in g["params"])
        logger.info("training %s: %.2f M parameters", args.network_module, n / 1e6)
        self.metadata = {
            "ss_network_module": args.network_module, "ss_network_dim": str(args.network_dim),
            "ss_network_alpha": str(args.network_alpha), "ss_network_dropout": str(args.network_dropout),
        }
        if args.network_args:  # as musubi-tuner writes it: each value as given after the '=', no parsing
            self.metadata["ss_network_args"] = json.dumps(dict(a.split("=", 1) for a in args.network_args))
        return groups

    def after_step(self, args, device) -> dict:
        if not args.scale_weight_norms:
            return {}
        if not hasattr(self.network, "apply_max_norm_regularization"):
            return {}
        scaled, mean_norm, max_norm = self.network.apply_max_norm_regularization(args.scale_weight_norms, device)
        return {"max_norm/keys_scaled": scaled, "max_norm/average_key_norm": mean_norm, "max_norm/max_key_norm": max_norm}

    def trainable_module(self) -> torch.nn.Module:
        return self.network

    def save(self, path: Path, dtype, metadata) -> Path:
        self.network.save_weights(str(path), dtype, metadata)  # our networks add the kohya model hashes (sshs_*)
        return path
