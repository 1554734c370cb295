"""Fine-tune resnet18 to recognise hot dogs, as in Dive into Deep Learning §14.2.

    python finetune.py --pretrained     # fine-tune the ImageNet net (book: test acc 0.940)
    python finetune.py --scratch        # the same net from random weights (book: 0.850)

Also --compare (both), --resume, --predict, --export and --show-samples: --help lists them. The
flags, printing and exit statuses are beyond.cli's; a run's life is beyond.runs'.
"""
import os
import sys

import torch

import beyond.cli
import beyond.processes
import beyond.runs


def main(argv=None):
    """Parse the command line, run what it asks for once, and return the exit status."""
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    options = vars(beyond.cli.parse_args(argv))  # only what was typed: the defaults are left out
    if "predict" in options:
        todo = beyond.cli.predict_images
    elif "export" in options:
        todo = beyond.cli.export
    elif options.get("mode") == "show-samples":
        todo = beyond.cli.show_samples
    else:
        todo = None
    if todo:  # under torchrun, by process 0 alone
        return 0 if beyond.processes.rank() > 0 else beyond.cli.guarded(todo, options)
    gpus = torch.cuda.device_count()  # several: one process each (the book: nn.DataParallel)
    if (gpus > 1 and not beyond.processes.under_torchrun()
            and beyond.runs.asked_device(options) in (None, "cuda")):
        return beyond.cli.on_all_gpus(argv, gpus, os.path.abspath(__file__))
    return beyond.cli.guarded(beyond.cli.train, options)


if __name__ == "__main__":
    sys.exit(main())
