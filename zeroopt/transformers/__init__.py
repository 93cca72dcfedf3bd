"""zeroopt in HuggingFace Transformers' Trainer (docs/TRANSFORMERS.md).

    from zeroopt.transformers import ZeroTrainer
    args = TrainingArguments(..., optim="adamw_bnb_8bit")            # Transformers' names
    args = TrainingArguments(..., optim="galore_adamw", optim_target_modules=["attn", "mlp"],
                             optim_args="rank=64,stage=2")
    args = TrainingArguments(..., optim_args="optimizer=lamb")       # any zeroopt name
    ZeroTrainer(model=model, args=args, train_dataset=data).train()

    # or a ZeroOptimizer of your own (build it after the model is on its device):
    ZeroTrainer(model=model, args=args, optimizers=(zeroopt.ZeroOptimizer(...), None))

    # or only the optimizer the Trainer would build, sharded:
    opt = zeroopt.transformers.create_optimizer(args, model)
"""

from .arguments import create_optimizer, optimizer_arguments, parse_optim_args, zeroopt_name
from .trainer import ZeroTrainer, check_params_are_views

__all__ = ["ZeroTrainer", "check_params_are_views", "create_optimizer", "optimizer_arguments",
           "parse_optim_args", "zeroopt_name"]
