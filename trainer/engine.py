"""Distributed set-up and the DeepSpeed engine, applied from outside the model (as torchtitan does)."""
from __future__ import annotations

import math
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.optim.lr_scheduler import LambdaLR

from dlmctl.spec import ExperimentSpec


PORT_ATTEMPTS = 5


@dataclass(frozen=True)
class World:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> World:
    """Join the process group set up by torchrun, a Kubeflow PyTorchJob, or nothing (one process)."""
    import deepspeed

    alone = _default_single_process_env()
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
        _skip_shm_op_build()
    for attempt in range(PORT_ATTEMPTS):
        if dist.is_initialized():
            break
        try:
            deepspeed.init_distributed(dist_backend=backend, verbose=False)
        except dist.DistNetworkError:
            # Alone, the rendezvous port was free when chosen but another process may have taken it since.
            if not alone or attempt == PORT_ATTEMPTS - 1:
                raise
            os.environ["MASTER_PORT"] = str(_free_port())
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)), device)


def _default_single_process_env() -> bool:
    """True when this process is alone (no launcher said otherwise) and its rendezvous was set up here.
    A PyTorchJob without torchrun injects RANK/WORLD_SIZE/MASTER_*; torchrun also sets LOCAL_RANK."""
    if "WORLD_SIZE" in os.environ:
        os.environ.setdefault("LOCAL_RANK", "0")
        return False
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _skip_shm_op_build() -> None:
    # DeepSpeed JIT-compiles a shared-memory allreduce op for CPU at init; gloo is fine and needs no compiler.
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def lr_lambda(spec: ExperimentSpec, total_steps: int):
    """LR multiplier per optimizer step: warmup-stable-decay, cosine, or constant after warmup."""
    s = spec.schedule
    warmup = int(s.warmup_fraction * total_steps)
    decay = int(s.decay_fraction * total_steps)
    floor = s.min_lr_ratio

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if s.kind == "constant":
            return 1.0
        if s.kind == "cosine":
            progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        decay_start = total_steps - decay
        if step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start + 1) / max(1, decay))
        return 1 - (1 - floor) * progress  # linear decay to min_lr_ratio

    return factor


def deepspeed_config(spec: ExperimentSpec, world: World) -> dict:
    o = spec.optimizer
    return {
        "train_batch_size": spec.global_batch_sequences,
        "train_micro_batch_size_per_gpu": spec.batch.micro_batch_sequences,
        "gradient_accumulation_steps": spec.accumulation(world.world_size),
        "gradient_clipping": o.grad_clip,
        "optimizer": {
            "type": "AdamW",
            # torch's fused AdamW (one kernel over all parameters, CPU and CUDA) through DeepSpeed: nothing is
            # compiled at run time, unlike DeepSpeed's own FusedAdam.
            "params": {"lr": o.lr, "betas": list(o.betas), "eps": o.eps, "weight_decay": o.weight_decay,
                       "torch_adam": True, "adam_w_mode": True, "fused": True},
        },
        "zero_optimization": {"stage": spec.deepspeed.zero_stage},
        "bf16": {"enabled": spec.precision == "bf16"},
        "steps_per_print": 2**31,
        "wall_clock_breakdown": False,
    }


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """The AdamW groups the model's variant chooses (trainer/models: matrices decayed, norms and other
    vectors not, a mixture of experts' router included, as in Megatron-LM)."""
    return model.param_groups(weight_decay)


def apply_activation_checkpointing(model: torch.nn.Module) -> None:
    for i, block in enumerate(model.blocks):
        model.blocks[i] = checkpoint_wrapper(block, preserve_rng_state=True)


def compiles(spec: ExperimentSpec, world: World) -> bool:
    """spec.model.compile, unset meaning on with CUDA; never under ZeRO-3, whose parameter-gathering hooks
    inside the blocks do not trace."""
    wanted = world.device.type == "cuda" if spec.model.compile is None else spec.model.compile
    return wanted and spec.deepspeed.zero_stage < 3


def apply_compile(model: torch.nn.Module) -> None:
    """torch.compile per block, as torchtitan does: every block is the same graph, compiled once (quicker than
    the whole model), and the parameters keep their names (Module.compile compiles in place)."""
    for block in model.blocks:
        block.compile()


def build_engine(model: torch.nn.Module, spec: ExperimentSpec, world: World, total_steps: int):
    import deepspeed

    if spec.deepspeed.activation_checkpointing:
        apply_activation_checkpointing(model)
    if compiles(spec, world):
        apply_compile(model)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model.to(world.device),
        model_parameters=param_groups(model, spec.optimizer.weight_decay),
        lr_scheduler=lambda opt: LambdaLR(opt, lr_lambda(spec, total_steps)),
        config=deepspeed_config(spec, world),
        dist_init_required=False,
    )
    if world.world_size == 1 and spec.deepspeed.zero_stage == 0:
        # One process has nothing to average: skip DeepSpeed's gradient all-reduce (a flatten, a gloo/NCCL
        # call and an unflatten of every gradient per step). ZeRO 1-2 move gradients into their partitions
        # on that path, so they keep it.
        engine.enable_backward_allreduce = False
    return engine, scheduler
