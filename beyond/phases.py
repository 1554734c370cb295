"""Two phases (Kumar et al., ICLR 2022): first a linear probe (the book's exercise 3), then every
layer with the book's groups."""
import contextlib

from torch import nn


def two_phases(book_epochs, net, first, frozen, num_epochs):
    """The book's epochs from epoch first + 1 on, the run's first `frozen` with features frozen."""
    if first < frozen:
        with features_frozen(net):
            yield from book_epochs(first, min(frozen, num_epochs))
    yield from book_epochs(max(first, frozen), num_epochs)


@contextlib.contextmanager
def features_frozen(net):
    """Exercise 3 for a while: only the output layer learns, BatchNorm statistics fixed."""
    features = [(p, p.requires_grad) for n, p in net.named_parameters() if not n.startswith("fc.")]
    norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for param, _ in features:
        param.requires_grad_(False)
    for bn in norms:  # net.train() calls each layer's train(): this one keeps eval mode
        bn.train = in_eval_mode(bn)
    try:
        yield net
    finally:
        for param, learned in features:  # --freeze keeps its own frozen
            param.requires_grad_(learned)
        for bn in norms:
            del bn.train


def in_eval_mode(module):
    return lambda mode=True: nn.Module.train(module, False)
