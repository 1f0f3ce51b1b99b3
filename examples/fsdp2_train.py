"""FSDP2 training with an snsm optimizer and a Distributed Checkpoint round trip.

Run: python -m torch.distributed.run --standalone --nproc_per_node 2 examples/fsdp2_train.py
(gloo on CPU; use nccl and .cuda() on GPUs). Prints the loss from rank 0.
"""
import tempfile

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import snsm

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
mesh = init_device_mesh("cpu", (world,))

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(32, 96), nn.GELU(), nn.Linear(96, 96), nn.GELU(), nn.Linear(96, 8))
for layer in model:
    if isinstance(layer, nn.Linear):
        fully_shard(layer, mesh=mesh)
fully_shard(model, mesh=mesh)
opt = snsm.AdamWSNSM(snsm.param_groups(model, rank=8, proj_gap=50), lr=1e-2, weight_decay=0.0)

gen = torch.Generator().manual_seed(rank)  # each rank its own data shard
target = nn.Linear(32, 8)
for step in range(60):
    x = torch.randn(64, 32, generator=gen)
    loss = nn.functional.mse_loss(model(x), target(x).detach())
    opt.zero_grad()
    loss.backward()
    opt.step()
    if step % 20 == 0 and rank == 0:
        print(f"step {step} loss {loss.item():.4f}")

# checkpoint: model and optimizer state as DTensors, each rank writes its rows
path = [tempfile.mkdtemp(prefix="snsm-dcp-") if rank == 0 else None]
dist.broadcast_object_list(path, src=0)
model_sd, optim_sd = get_state_dict(model, opt)
dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path[0])
model_sd, optim_sd = get_state_dict(model, opt)
state = {"model": model_sd, "optim": optim_sd}
dcp.load(state, checkpoint_id=path[0])
set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
if rank == 0:
    print(f"final loss {loss.item():.4f}; checkpoint in {path[0]}")
dist.barrier()
dist.destroy_process_group()
