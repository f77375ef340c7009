"""``distill prepare``: a transfer set (IDX folder, .npz arrays, image folder) into the prepared file."""
from __future__ import annotations

from pathlib import Path

import click

from commands.main import PathArg, importing, say, stage_command
from stages.prepare.settings import PrepareConfig

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


@stage_command("prepare", PrepareConfig)
@click.option("--source", type=PathArg, default=None, help="directory of MNIST-format IDX files "
              "[default: /usr/share/datasets/fashion-mnist unless --npz or --image-folder is given]")
@click.option("--npz", type=PathArg, default=None, help=".npz file with arrays x and y (y = -1: unlabelled), "
              "optionally x_test and y_test; x laid out as --layout says")
@click.option("--image-folder", type=PathArg, default=None, help="folder of PNG/JPEG images: one subfolder per "
              "class, or train/ and test/ each with one subfolder per class (see --size, --mode)")
@click.option("--out", type=PathArg, required=True, help="prepared HDF5 file to write")
def prepare(cfg, source, npz, image_folder, out):
    if source is None and npz is None and image_folder is None:
        source = FASHION_MNIST
    with importing("the prepare stage"):
        from stages.prepare import prepare_dataset

    prepare_dataset(cfg, out, source=source, npz=npz, image_folder=image_folder, log=say)
    say(f"prepared -> {out}")
