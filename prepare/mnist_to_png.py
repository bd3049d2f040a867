"""
MNIST idx files -> class folders of PNG files, the layout `prepare/tiny_cls.py --image_dir` reads:
OUT/train/<digit>/<index>.png (the 60,000 train images) and OUT/val/<digit>/<index>.png (t10k).
It exists to check the image-folder path against the idx path on the same images (README).

    python prepare/mnist_to_png.py --mnist_dir ../shared/data/mnist --out data/mnist_png
    python prepare/tiny_cls.py --image_dir data/mnist_png --name tiny_cls_mnist_png

Files are named by their index in the idx file, zero-padded, so sorted order is file order.
The folder is built aside and swapped in whole (data.building): never half written.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from PIL import Image
from tqdm import tqdm

import data
from settings import cli
from prepare.tiny_cls import load_mnist


def write_pngs(out_dir: str, images, labels) -> None:
    """images (N, 28, 28) uint8 as out_dir/<label>/<index>.png, 8-bit gray."""
    for label in sorted(set(labels.tolist())):
        os.makedirs(os.path.join(out_dir, str(label)), exist_ok=True)
    for i, (image, label) in enumerate(tqdm(zip(images, labels), total=len(images),
                                            desc=os.path.basename(out_dir), disable=None, leave=False)):
        Image.fromarray(image).save(os.path.join(out_dir, str(label), f"{i:05d}.png"))


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mnist_dir", required=True, help="folder with the four MNIST idx files (.gz or not)")
    p.add_argument("--out", default=os.path.join("data", "mnist_png"), help="the folder to write")
    args = p.parse_args(argv)
    t0 = time.time()
    mnist = load_mnist(args.mnist_dir)
    with data.building(args.out) as build_dir:
        for split, (images, labels) in mnist.items():
            write_pngs(os.path.join(build_dir, split), images, labels)
    counts = ", ".join(f"{split} {len(labels)}" for split, (_, labels) in mnist.items())
    print(f"{args.out}: {counts} PNG files in class folders ({time.time() - t0:.1f}s)")
    return args.out


if __name__ == "__main__":
    cli(main)
