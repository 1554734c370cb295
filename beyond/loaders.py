"""The loaders: shuffled for training, ordered for testing, each process its share."""
import os

import torch
from torch.utils.data import DataLoader, DistributedSampler, Subset

from beyond import UserError, options
from beyond.processes import local_processes, rank, world_size


def default_workers(workers=None):
    """workers, else one per core this process may use, shared among this machine's, at most 16."""
    if workers is not None:
        return workers
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(16, cores // local_processes()))


def make_loaders(train_set, test_set, batch_size=128, workers=0, seed=0, persistent=True):
    """Shuffled training and ordered test loaders, each process its share under torchrun.
    persistent: workers started each epoch would copy every page this process wrote meanwhile."""
    world, batch_size = world_size(), options.checked_number("batch_size", batch_size)
    if batch_size < world:
        raise UserError(f"batch_size={batch_size} is smaller than the {world} processes; "
                        "give at least one image per process")
    sampler = DistributedSampler(train_set, seed=seed) if world > 1 else None
    if world > 1:
        test_set = Subset(test_set, range(rank(), len(test_set), world))
    opts = dict(num_workers=workers, prefetch_factor=4 if workers else None,
                pin_memory=torch.cuda.is_available(), persistent_workers=persistent and workers > 0)
    return (DataLoader(train_set, batch_size // world, shuffle=world == 1, sampler=sampler, **opts),
            DataLoader(test_set, batch_size // world, **opts))
