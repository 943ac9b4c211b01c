"""Full finetuning of the Qwen-Image DiT (all model versions): not a LoRA, the model itself."""

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: import the package from src/, not this folder's siblings
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from musubi_tuner import cli_options as opts  # noqa: E402
from musubi_tuner.errors import UserError, cli_main  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=opts.HelpFormatter)
    opts.add_training_args(p)
    f = p.add_argument_group("full finetuning")
    f.add_argument("--full_bf16", action="store_true", help="keep the weights in bf16 (optimizer state as the "
                   "optimizer keeps it: Adafactor in fp32); pair with --fused_backward_pass for stochastic rounding")
    f.add_argument("--fused_backward_pass", action="store_true", help="Adafactor: step each parameter inside "
                   "backward and free its gradient (bf16 stochastic rounding); no gradient accumulation")
    f.add_argument("--mem_eff_save", action="store_true", help="write checkpoints tensor by tensor (less RAM)")
    f.add_argument("--fsdp", action="store_true", help="shard the model, gradients and optimizer state over the "
                   "processes (FSDP FULL_SHARD, one unit per transformer block); saves full weights from rank 0 and "
                   "sharded resumable states")
    n = p.add_argument_group("musubi-tuner network options (accepted by its full-finetune parser, no effect there)")
    why = "full finetuning trains the DiT itself, not a network"
    n.add_argument("--network_module", type=str, action=opts.Inert, why=why)
    n.add_argument("--network_dim", type=int, action=opts.Inert, why=why)
    n.add_argument("--network_alpha", type=float, action=opts.Inert, why=why)
    n.add_argument("--network_dropout", type=float, action=opts.Inert, why=why)
    n.add_argument("--network_args", nargs="*", action=opts.Inert, why=why)
    n.add_argument("--network_weights", type=str, action=opts.Inert, why=why)
    n.add_argument("--dim_from_weights", action=opts.Inert, why=why)
    return p


@cli_main
def main(argv=None):
    args = opts.parse_args(build_parser(), argv)
    for flag in ("fp8_base", "fp8_scaled"):
        if getattr(args, flag):
            raise UserError(f"--{flag} cannot be used for full finetuning (fp8 weights cannot be trained); use "
                            "--full_bf16 and --fused_backward_pass to save memory")
    from musubi_tuner.training.full import FullMode
    from musubi_tuner.training.trainer import run_training

    return run_training(args, FullMode())


if __name__ == "__main__":
    main()
