#!/usr/bin/env python
"""Convert a checkpoint into this project's format, or export one of ours to transformers' ViT or to timm.

In: an official facebookresearch/mae checkpoint (.pth), a timm ViT (a state dict file, a `save_for_hf` folder or a
Hub id such as timm/vit_base_patch16_224.mae) or a transformers ViTMAE model (folder or Hub id, v4 or v5 key names).

    python run_scripts/convert_checkpoint.py --source mae_visualize_vit_large.pth --output_dir mae-large
    python run_scripts/convert_checkpoint.py --source timm/vit_base_patch16_224.mae --output_dir mae-base-timm
    python run_scripts/convert_checkpoint.py --source facebook/vit-mae-base --output_dir mae-base
    python run_scripts/convert_checkpoint.py --source facebook/vit-mae-base --output_dir mae-base-4band --num_channels 4
    python run_scripts/convert_checkpoint.py --source mae-base --output_dir vit-base --to_vit
    python run_scripts/convert_checkpoint.py --source mae-finetuned --output_dir timm-finetuned --to_timm
"""

from __future__ import annotations

import argparse
import sys

from modeling_mae.errors import exit_process, run_main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", required=True,
                        help="official .pth, timm file/folder/Hub id, ViTMAE folder or Hub id; with --to_* one of ours")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--config_overrides", default=None, help='"k=v,..." e.g. "norm_pix_loss=true"')
    parser.add_argument("--num_channels", type=int, default=None,
                        help="adapt RGB weights to this many input channels (1: kernels summed; more: repeated and "
                        "scaled by 3/C); image_mean/image_std in --config_overrides are then the new channels'")
    export = parser.add_mutually_exclusive_group()
    export.add_argument("--to_vit", action="store_true", help="export our encoder to transformers' ViT layout")
    export.add_argument("--to_timm", action="store_true", help="export our encoder or classifier to timm's ViT")
    args = parser.parse_args(argv)
    if args.num_channels is not None and (args.to_vit or args.to_timm):
        parser.error("--num_channels adapts weights converted into this project's format, not an export")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # After parsing: torch and transformers take seconds to import, which `--help` does without.
    from transformers import ViTModel

    from modeling_mae.interop.conversion import (
        VIT_POOLER_NOTE,
        convert_checkpoint,
        export_to_timm,
        load_ours,
        save_vit_folder,
    )

    if args.to_vit:
        model = save_vit_folder(load_ours(args.source), args.output_dir)
        if isinstance(model, ViTModel):
            print(f"warning: {VIT_POOLER_NOTE}", file=sys.stderr)
    elif args.to_timm:
        spec = export_to_timm(load_ours(args.source), args.output_dir)
        print(f"saved timm {spec.architecture} to {args.output_dir}; load it with\n"
              f'  timm.create_model("local-dir:{args.output_dir}", pretrained=True)\nor\n'
              f"  {spec.create_model_call(f'{args.output_dir}/model.safetensors')}")
        return
    else:
        model = convert_checkpoint(args.source, args.output_dir, args.config_overrides, args.num_channels)
    print(f"saved {type(model).__name__} to {args.output_dir}")


if __name__ == "__main__":
    exit_process(run_main(main))
