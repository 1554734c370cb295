"""Where training time goes: start-up, the model alone, the whole input pipeline, and memory.

    python -m beyond.benchmark --data-dir DIR          # a folder with train/ and test/
    python -m beyond.benchmark --dummy --batches 2 --batch-size 8   # no data (CI: --device cpu)

Model-only trains on one batch already on the device, which no input pipeline can beat:
pipeline / model-only says how busy loading keeps the device.
"""
import time

START = time.perf_counter()  # before the imports: importing torch is part of every run's start-up

import argparse  # noqa: E402
import itertools  # noqa: E402
import resource  # noqa: E402

import torch  # noqa: E402

import models  # noqa: E402
from beyond import cli, folders, loaders, runs  # noqa: E402
from beyond.archs import preprocessing  # noqa: E402
from beyond.devices import make_runtime, try_device  # noqa: E402
from beyond.options import AT_LEAST_1, takes  # noqa: E402
from train import fine_tuning_loss, fine_tuning_optimizer, train_epoch  # noqa: E402

IMPORT_SEC = time.perf_counter() - START


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_epoch(net, batches, optimizer, runtime):
    """Examples per second of train_epoch over the batches, the device's queue drained."""
    sync(runtime.device)
    start = time.perf_counter()
    n = train_epoch(net, batches, fine_tuning_loss(), optimizer, runtime)["examples"]
    sync(runtime.device)
    return n / (time.perf_counter() - start)


def loader_only(batches):
    """Examples per second of the loader alone: decoding, augmenting and collating, no model."""
    start = time.perf_counter()
    n = sum(len(y) for _, y in batches)
    return n / (time.perf_counter() - start)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", help="a folder with train/ and test/ ImageFolders")
    p.add_argument("--dummy", action="store_true", help="FakeData shaped like the hot-dog set")
    p.add_argument("--batches", type=int, help="batches per measurement (default: one epoch)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=loaders.default_workers())
    p.add_argument("--arch", default="resnet18",
                   help="an ImageNet classifier of torchvision's that ends in one Linear layer")
    p.add_argument("--device")
    p.add_argument("--precision", choices=["amp", "fp32"], default="amp")
    p.add_argument("--no-cache", action="store_true")
    args = p.parse_args()
    if not (args.dummy or args.data_dir):
        p.error("give --data-dir DIR or --dummy")
    if args.batches is not None and args.batches < 1:
        p.error(f"--batches {args.batches} is not {takes(int, AT_LEAST_1)}")
    cli.script(p, measure, args)


def measure(args):
    """Time start-up, the model alone, the pipeline and the loader alone; print the figures."""
    given = dict(data_dir=args.data_dir, dummy=args.dummy, arch=args.arch, workers=args.workers,
                 batch_size=args.batch_size, cache_gb=0 if args.no_cache else None)
    options = runs.settled("scratch", given)
    device = try_device(args.device)
    start = time.perf_counter()
    sets = runs.load_sets(options)  # the command line's data, at the sizes the arch was trained at
    data_sec = time.perf_counter() - start
    train_iter, _ = loaders.make_loaders(*sets[:2], args.batch_size, args.workers)
    batches = min(args.batches or len(train_iter), len(train_iter))  # no more than the data holds

    # the recipe's net, optimizer and precision; speed does not depend on the weights
    runtime = make_runtime(device, args.precision)
    net = runtime.place(models.scratch_net(len(folders.class_names(sets[0])), args.arch))
    optimizer = fine_tuning_optimizer(net, 5e-5)
    size = preprocessing(args.arch)

    start = time.perf_counter()
    X, y = next(iter(train_iter))  # starts the (persistent) workers
    first_sec = time.perf_counter() - start
    batch = [(X.to(device), y.to(device))]
    timed_epoch(net, batch * 3, optimizer, runtime)  # warm-up: kernels, allocator
    model_only = timed_epoch(net, batch * batches, optimizer, runtime)
    pipeline = timed_epoch(net, itertools.islice(train_iter, batches), optimizer, runtime)
    loader = loader_only(itertools.islice(train_iter, batches))

    fewer = (f" (--batch-size {args.batch_size}: the data holds fewer)"
             if len(y) < args.batch_size else "")
    print(f"{args.arch} at {size['crop']} px, {runtime}, batch {len(y)}{fewer}, {args.workers} "
          f"workers, {torch.get_num_threads()} compute threads, {batches} batches per measurement")
    print(f"start-up: imports {IMPORT_SEC:.1f} s and workers with the first batch "
          f"{first_sec:.1f} s (fixed); data ready {data_sec:.1f} s for {sum(map(len, sets))} "
          "images (grows with the data)")
    print(f"model only: {model_only:.1f} examples/sec")
    print(f"pipeline:   {pipeline:.1f} examples/sec ({pipeline / model_only:.0%} of model only)")
    print(f"loader only: {loader:.1f} examples/sec ({loader / max(1, args.workers):.1f} per worker"
          f"{'' if args.workers else ', in the main process'})")
    host = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    gpu = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    print(f"peak memory: host {host:.2f} GiB" + ("" if gpu is None else f", GPU {gpu:.2f} GiB"))


if __name__ == "__main__":
    main()
