"""What a run trains, recorded in every checkpoint and checked before a resume loads anything: the model and the data.

A resume applies the saved weights, optimizer state and data-stream position to what this run's flags build, so:
- the data: the dataset, its configuration, the split trained on, the sample limits, and a fingerprint of the split's
  files (their names inside the dataset's folder or Hub repository, and a local file's size). Other data is refused:
  the saved stream position would be applied to it. The folder's location is recorded, not compared: the same files
  copied elsewhere (a node's local disk) are the same data;
- the model: its config, but for bookkeeping fields. Another architecture or size is refused: its weights would not
  load (a 64-line state-dict traceback otherwise);
- the objective (`OBJECTIVE_FIELDS`: the mask ratio, the normalised-pixel loss, drop path): refused too, unless
  `--allow_objective_change` says the change is meant; the run then logs it in its history.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from transformers import PretrainedConfig

from ..arguments import RUN_CONFIG_FILE
from ..data.sources import DataArguments, load_source, sample_dataset_path
from ..errors import UsageError

OBJECTIVE_FIELDS = ("mask_ratio", "norm_pix_loss", "drop_path_rate")
# Config fields that say nothing of what is trained: where it was loaded from, library versions, output switches.
BOOKKEEPING_FIELDS = frozenset({"_name_or_path", "architectures", "auto_map", "transformers_version", "dtype",
                                "torch_dtype", "output_attentions", "output_hidden_states", "return_dict"})
DATA_LOCATION = "dataset"  # recorded for the messages, not compared
SHOWN_VALUE_CHARS = 60  # a value longer than this (a label map) is cut in messages


@dataclass(frozen=True)
class RunIdentity:
    model: dict[str, Any]  # the config's fields, as JSON has them
    data: dict[str, Any]

    def to_json(self) -> dict[str, dict[str, Any]]:
        return {"model": self.model, "data": self.data}

    @classmethod
    def from_json(cls, values: Any) -> RunIdentity:
        """`to_json`'s output read back; anything else is a `ValueError`."""
        if not (isinstance(values, dict) and all(isinstance(values.get(part), dict) for part in ("model", "data"))):
            raise ValueError(f"run identity {values!r} is not a mapping of a model and a data mapping")
        return cls(values["model"], values["data"])


def run_identity(config: PretrainedConfig, data_args: DataArguments, split_name: str) -> RunIdentity:
    """What a run trains: `config`'s model on split `split_name` of `data_args`'s dataset."""
    model = {key: value for key, value in config.to_dict().items() if key not in BOOKKEEPING_FIELDS}
    return RunIdentity(json.loads(json.dumps(model, default=str)), data_identity(data_args, split_name))


def data_identity(args: DataArguments, split_name: str) -> dict[str, Any]:
    name = args.dataset_name or str(sample_dataset_path())
    local = pathlib.Path(name).expanduser()
    files = [str(file) for file in (load_source(args).config.data_files or {}).get(split_name, [])]
    entries = sorted(file_entry(file, local.resolve() if local.exists() else None) for file in files)
    return {
        DATA_LOCATION: str(local.resolve()) if local.exists() else name,
        "dataset_config_name": args.dataset_config_name,
        "split": split_name,
        "max_train_samples": args.max_train_samples,
        "holdout": [args.holdout_fraction, args.holdout_seed] if args.holdout_fraction is not None else None,
        "files": len(files),
        "fingerprint": hashlib.sha256(json.dumps(entries).encode()).hexdigest()[:16],
    }


def file_entry(file: str, folder: pathlib.Path | None) -> tuple[str, int | None]:
    """A data file as the fingerprint sees it: its name inside the dataset's `folder` and its size, or for a Hub file
    its URL without the revision (a new commit of the repository is the same data when its files are)."""
    if folder is not None:
        path = pathlib.Path(file).resolve()
        return os.path.relpath(path, folder), path.stat().st_size
    return re.sub(r"@[^/]+/", "/", file, count=1), None


def changed(saved: Mapping[str, Any], current: Mapping[str, Any], fields: set[str]) -> dict[str, list[Any]]:
    """`{field: [saved value, current value]}` for each of `fields` whose value differs."""
    return {key: [saved.get(key), current.get(key)] for key in sorted(fields) if saved.get(key) != current.get(key)}


def describe_changes(changes: Mapping[str, list[Any]]) -> str:
    """`mask_ratio 0.75 -> 0.5, hidden_size 32 -> 64`."""
    return ", ".join(f"{key} {shown(old)} -> {shown(new)}" for key, (old, new) in changes.items())


def shown(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= SHOWN_VALUE_CHARS else f"{text[:SHOWN_VALUE_CHARS]}..."


def check_resumed_identity(
    saved: RunIdentity, current: RunIdentity, checkpoint: pathlib.Path, allow_objective_change: bool
) -> dict[str, list[Any]]:
    """Refuse resuming `checkpoint` (which trained `saved`) into a run of other data or another model, and of another
    objective unless `allow_objective_change`; returns the objective's changes, `{field: [old, new]}`."""
    start_over = "or start a new run in another --output_dir"
    data = changed(saved.data, current.data, (saved.data.keys() | current.data.keys()) - {DATA_LOCATION})
    if data:
        moved = changed(saved.data, current.data, {DATA_LOCATION})  # named when it differs too
        raise UsageError(
            f"{checkpoint} was trained on other data ({describe_changes({**moved, **data})}): its "
            f"data-stream position means nothing on this data. Resume with the data it was trained on, {start_over}"
        )
    objective_fields = set(OBJECTIVE_FIELDS)
    model = changed(saved.model, current.model, (saved.model.keys() | current.model.keys()) - objective_fields)
    if model:
        raise UsageError(
            f"{checkpoint} holds another model ({describe_changes(model)}): resume with the model flags it was trained "
            f"with (--model_config, --config_overrides: {checkpoint.parent / RUN_CONFIG_FILE}), {start_over}"
        )
    objective = changed(saved.model, current.model, objective_fields)
    if objective and not allow_objective_change:
        raise UsageError(
            f"{checkpoint} was trained with another objective ({describe_changes(objective)}): pass "
            "--allow_objective_change to go on with this run's (the change is logged in the run's history), or "
            "resume with the values it was trained with"
        )
    return objective
