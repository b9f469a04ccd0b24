"""Train your own network with distvision from Python, then evaluate and use its checkpoint.

    python examples/own_model.py --data PATH [--workers 2] [--epochs 3] [--out runs/own-model]

PATH is anything `distvision train --data` reads: an image folder tree, a CSV list of images, an .npz,
CIFAR-10's batches (without --data, CIFAR-10 is downloaded). The same model from the shell:

    distvision train --data PATH --model examples/own_model.py:small_cnn --workers 2
"""

from __future__ import annotations

import argparse

from torch import nn

import distvision


def small_cnn(num_classes: int, image_size: int = 32) -> nn.Module:
    """Three conv blocks and a linear head; distvision passes num_classes (and image_size, if taken)."""

    def block(inputs: int, outputs: int) -> list[nn.Module]:
        return [nn.Conv2d(inputs, outputs, 3, padding=1, bias=False), nn.BatchNorm2d(outputs), nn.ReLU(),
                nn.MaxPool2d(2)]

    return nn.Sequential(*block(3, 32), *block(32, 64), *block(64, 128), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(128, num_classes))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="default: download CIFAR-10")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--out", default="runs/own-model")
    parser.add_argument("--classify", metavar="FOLDER", help="also classify the images in this folder")
    args = parser.parse_args()

    # The function travels to the workers by its import path: it must be defined at the top level of
    # this file, and this call kept under `if __name__ == "__main__":` (the workers import the file).
    summary = distvision.train(data=args.data, model=small_cnn, workers=args.workers, epochs=args.epochs,
                               out=args.out, set=["flip=true", "translate=2"])
    print(f"trained: test accuracy {summary['test_accuracy']:.4f} in {summary['wall_seconds']:.0f} s")
    checked = distvision.evaluate(checkpoint=args.out, data=summary["data"])
    print(f"evaluated again from the checkpoint: {checked['test_accuracy']:.4f}")
    if args.classify:
        result = distvision.classify(checkpoint=args.out, input=args.classify, out=f"{args.out}/predictions.csv")
        print(f"classified {result['images']} images into {args.out}/predictions.csv")


if __name__ == "__main__":
    main()
