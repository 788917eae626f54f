"""The scaling study's design (`run_scripts/scaling_study.py`): the protocols compared, the ladders of encoder
sizes (`Rung`) and the budgets, and the rules that scale the paper's recipe down, fixed before any run.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from ..arguments import DEFAULT_MODEL_CONFIG
from ..configuration_mae import load_config
from ..modeling_mae import MAEModel

PROTOCOLS = {  # cell key -> column title
    "scratch": "from scratch, fine-tuning recipe",
    "mae": "MAE pretrained, fine-tuned",
    "linprobe": "MAE linear probe",
    "knn": "MAE k-NN",
}


Results = dict[str, dict[str, Any]]  # a protocol's all_results.json, by PROTOCOLS key


# The paper's per-size fine-tuning settings (appendix A.1, Table 9): rung i of every ladder takes model i's.
PAPER_SIZES = (
    {"paper_model": "ViT-B", "layer_decay": 0.65, "drop_path_rate": 0.1, "paper_base_lr": 5e-4},
    {"paper_model": "ViT-L", "layer_decay": 0.75, "drop_path_rate": 0.2, "paper_base_lr": 1e-3},
    {"paper_model": "ViT-H", "layer_decay": 0.75, "drop_path_rate": 0.3, "paper_base_lr": 1e-3},
)


# The paper's schedules have ~1e5 optimizer steps, ours 1e2-1e3: at a few hundred steps the paper's learning rates
# barely move the weights (evidence.py, measured before this study). Both factors are the ones the repository already
# used for short runs: run_mae.py's default base lr 1.5e-3 (10 x 1.5e-4) and evidence.py's 4e-3 (4 x 1e-3).
PRETRAIN_BASE_LR = 1.5e-4 * 10


FINETUNE_LR_FACTOR = 4


PRETRAIN_WARMUP_FRACTION = 0.05  # the paper's 40 of 800 epochs


FINETUNE_WARMUP_FRACTION = 0.1  # the paper's 5 of 50 epochs (ViT-L/H)


RECIPE_RULES = (
    "Images: 32 px, 4 px patches (64 patches; the paper: 224 px, 16 px patches, 196 patches).",
    ("Sizes: a ladder of three encoder widths with the same depth and decoder (the paper keeps one 512x8 decoder "
     "for ViT-B/L/H); rung i takes the paper's per-size fine-tuning settings of ViT-B, L, H: layer decay "
     "0.65/0.75/0.75, drop path 0.1/0.2/0.3, base lr 5e-4/1e-3/1e-3."),
    (f"Learning rates: base lr x batch / 256 (the paper's rule), with base lrs {FINETUNE_LR_FACTOR}x the paper's for "
     f"fine-tuning and {PRETRAIN_BASE_LR:g} (10x the paper's 1.5e-4) for pretraining, because our schedules have "
     "1e2-1e3 optimizer steps instead of ~1e5."),
    (f"Warmup: {PRETRAIN_WARMUP_FRACTION:.0%} of the pretraining epochs (the paper's 40 of 800), "
     f"{FINETUNE_WARMUP_FRACTION:.0%} of the fine-tuning epochs (the paper's 5 of 50)."),
    "Pretraining: mask ratio 0.75, norm_pix_loss, AdamW (0.9, 0.95), weight decay 0.05, RandomResizedCrop + flip.",
    ("Fine-tuning: AdamW (0.9, 0.999), weight decay 0.05, RandAugment(9, 0.5), random erasing 0.25, MixUp 0.8, "
     "CutMix 1.0, label smoothing 0.1, global-pool head; the same epochs, batch and base lr for both inits."),
    ("Scratch: the fine-tuning recipe without layer decay (1.0): decay keeps pretrained lower layers close to their "
     "weights, which a random init does not have (the paper's from-scratch recipe has none either)."),
    ("Score: top-1 on the validation split after the last fine-tuning epoch (not the best epoch); mean and sample "
     "standard deviation over the seeds."),
)


@dataclass(frozen=True)
class Rung:
    """One encoder size of the ladder, with the paper's settings for its place in the ladder."""

    name: str
    width: int
    depth: int
    heads: int
    paper_model: str
    layer_decay: float
    drop_path_rate: float
    paper_base_lr: float

    @property
    def slug(self) -> str:
        return self.name.lower()

    @property
    def finetune_base_lr(self) -> float:
        return self.paper_base_lr * FINETUNE_LR_FACTOR

    def encoder_overrides(self) -> str:
        return (f"hidden_size={self.width},num_hidden_layers={self.depth},num_attention_heads={self.heads},"
                f"intermediate_size={4 * self.width}")


@dataclass(frozen=True)
class Budget:
    """How big the study is: the ladder, the seeds, the epochs and the data."""

    names: tuple[str, str, str]
    widths: tuple[int, int, int]
    heads: tuple[int, int, int]
    depth: int
    decoder_overrides: str
    seeds: tuple[int, ...]
    pretrain_epochs: float
    finetune_epochs: float
    sweep_epochs: tuple[float, ...]  # pretraining lengths of the schedule figure, pretrain_epochs among them
    batch_size: int
    eval_batch_size: int  # of every evaluation, and the linear probe's batch of cached features
    dataloader_num_workers: int
    data_flags: tuple[str, ...] = ()

    def rungs(self) -> list[Rung]:
        return [Rung(name, width, self.depth, heads, **paper)
                for name, width, heads, paper in zip(self.names, self.widths, self.heads, PAPER_SIZES)]

    def sweep_rung(self) -> Rung:
        """The middle size (the paper's schedule figure uses its middle model, ViT-L)."""
        return self.rungs()[1]


BUDGETS = {
    # CI: tiny models on 32 of the sample's images, two seeds (a standard deviation); checks the plumbing only.
    "smoke": Budget(
        names=("ViT-8", "ViT-16", "ViT-32"), widths=(8, 16, 32), heads=(2, 2, 2), depth=1,
        decoder_overrides="decoder_hidden_size=16,decoder_num_hidden_layers=1,decoder_num_attention_heads=2,"
                          "decoder_intermediate_size=32",
        seeds=(0, 1), pretrain_epochs=1, finetune_epochs=1, sweep_epochs=(0.5, 1), batch_size=8,
        eval_batch_size=16, dataloader_num_workers=0,
        data_flags=("--max_train_samples", "32", "--max_eval_samples", "16"),
    ),
    # A 2-core CPU: tiny-32px's 6 blocks and decoder at widths 32/64/128 (1:2:4, as ViT-Ti/S/B), 2 heads.
    "cpu": Budget(
        names=("ViT-32", "ViT-64", "ViT-128"), widths=(32, 64, 128), heads=(2, 2, 2), depth=6,
        decoder_overrides="", seeds=(0, 1, 2), pretrain_epochs=4, finetune_epochs=2, sweep_epochs=(1, 2, 4),
        batch_size=64, eval_batch_size=256, dataloader_num_workers=0,
    ),
    # One H100/H200: ViT-Ti/S/B (12 blocks, 64-wide heads) with the tiny/small presets' 256x4 decoder.
    "gpu": Budget(
        names=("ViT-Ti", "ViT-S", "ViT-B"), widths=(192, 384, 768), heads=(3, 6, 12), depth=12,
        decoder_overrides="decoder_hidden_size=256,decoder_num_hidden_layers=4,decoder_num_attention_heads=8,"
                          "decoder_intermediate_size=1024",
        seeds=(0, 1, 2), pretrain_epochs=8, finetune_epochs=2, sweep_epochs=(2, 4, 8), batch_size=256,
        eval_batch_size=256, dataloader_num_workers=8,
    ),
}


@functools.cache  # the summary is rewritten after every seed; building ViT-B to count it once is enough
def encoder_parameters(rung: Rung) -> int:
    """Parameters of the encoder that is fine-tuned (position table included, as in the paper's 86M for ViT-B)."""
    return MAEModel(load_config(DEFAULT_MODEL_CONFIG, rung.encoder_overrides())).num_parameters()
