#!/usr/bin/env python
"""Convert an official facebookresearch/mae checkpoint (.pth) or a transformers ViTMAE model (folder
or Hub id, v4 or v5 key names) into this project's format, or export one of ours to transformers' ViT.

    python run_scripts/convert_checkpoint.py --source mae_visualize_vit_large.pth --output_dir mae-large
    python run_scripts/convert_checkpoint.py --source facebook/vit-mae-base --output_dir mae-base
    python run_scripts/convert_checkpoint.py --source mae-base --output_dir vit-base --to_vit
"""

from __future__ import annotations

import argparse
import sys

from modeling_mae.conversion import convert_checkpoint, load_ours, to_transformers_vit
from modeling_mae.errors import run_main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", required=True, help="official .pth, ViTMAE folder or Hub id; with --to_vit one of ours")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--config_overrides", default=None, help='"k=v,..." e.g. "norm_pix_loss=true"')
    parser.add_argument("--to_vit", action="store_true", help="export our encoder to transformers' ViT layout")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.to_vit:
        model = to_transformers_vit(load_ours(args.source))
        model.save_pretrained(args.output_dir)
    else:
        model = convert_checkpoint(args.source, args.output_dir, args.config_overrides)
    print(f"saved {type(model).__name__} to {args.output_dir}")


if __name__ == "__main__":
    sys.exit(run_main(main))
