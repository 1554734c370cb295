"""A learning-rate schedule beyond the book's constant rate, built from torch.optim.lr_scheduler
and stepped once per epoch from outside the book's loop, as torchvision's references step theirs.
"""
from torch.optim import lr_scheduler


def epoch_schedule(optimizer, kind, warmup_epochs, epochs):
    """None for the book's constant rate. "cosine": epoch e of the first warmup_epochs at
    e / (warmup_epochs + 1) of each group's rate, then a cosine to zero at the run's end."""
    if kind is None:
        return None
    cosine = lr_scheduler.CosineAnnealingLR(optimizer, epochs - warmup_epochs)
    if not warmup_epochs:
        return cosine
    warmup = lr_scheduler.LinearLR(optimizer, 1 / (warmup_epochs + 1), total_iters=warmup_epochs)
    return lr_scheduler.SequentialLR(optimizer, [warmup, cosine], milestones=[warmup_epochs])
