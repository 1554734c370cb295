"""Two phases (Kumar et al., ICLR 2022): first the output layer alone, the features and their
BatchNorm statistics fixed (a linear probe, the book's exercise 3 for a while), then every layer
with the book's groups."""
import contextlib

from torch import nn


def two_phases(book_epochs, net, first, frozen, num_epochs):
    """The book's epochs from epoch first + 1 on, in two phases (Kumar et al., ICLR 2022): a linear
    probe, the first `frozen` epochs training only the output layer with the features and their
    BatchNorm statistics fixed (features_frozen), then every layer with the book's groups.
    With frozen 0, the book's epochs as they are."""
    if first < frozen:
        with features_frozen(net):
            yield from book_epochs(first, min(frozen, num_epochs))
    yield from book_epochs(max(first, frozen), num_epochs)


@contextlib.contextmanager
def features_frozen(net):
    """For a while, exercise 3: only the output layer learns, and the BatchNorm layers compute as
    at test time, their statistics fixed. The layers stay the same objects (models.freeze_features
    replaces them for good), so a checkpoint written meanwhile loads into the whole net."""
    features = [(param, param.requires_grad) for name, param in net.named_parameters() if not name.startswith("fc.")]
    norms = [module for module in net.modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)]
    for param, _ in features:
        param.requires_grad_(False)
    for bn in norms:  # net.train() calls each layer's train(): this one's keeps it in eval mode
        bn.train = in_eval_mode(bn)
    try:
        yield net
    finally:
        for param, learned in features:  # as they were (--freeze keeps its own frozen)
            param.requires_grad_(learned)
        for bn in norms:
            del bn.train


def in_eval_mode(module):
    """A train(mode) for module that leaves it in eval mode, whatever the mode."""
    return lambda mode=True: nn.Module.train(module, False)
