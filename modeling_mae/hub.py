"""Export a trained model as a self-contained `from_pretrained` folder, describe it in a model card, push it.

The export folder is the run's `output_dir`: weights (safetensors), `config.json` with an `auto_map`, the two code
files, `preprocessor_config.json`, README.md, results and figures. Checkpoint folders inside it are never uploaded.
"""

from __future__ import annotations

import logging
import os
import pathlib
from collections.abc import Iterable, Mapping
from concurrent.futures import Future
from typing import Any

from accelerate import Accelerator
from huggingface_hub import HfApi
from torch import nn

logger = logging.getLogger(__name__)

# Training state stays local: checkpoints (and their staging folders) and tracker logs that are still being written.
UPLOAD_IGNORE_PATTERNS = ["step_*", ".step_*", "runs/*"]


def export_model(accelerator: Accelerator, model: nn.Module, output_dir: str | os.PathLike[str]) -> None:
    """Write `model` (as prepared by Accelerate) to `output_dir` in the `save_pretrained` layout; call on every process.

    The full state dict is gathered first (a collective under DeepSpeed ZeRO-3) and saved in float32 whatever the
    training precision, like the official checkpoints.
    """
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        state_dict = {
            name: tensor.float() if tensor.is_floating_point() else tensor for name, tensor in state_dict.items()
        }
        accelerator.unwrap_model(model, keep_torch_compile=False).save_pretrained(
            output_dir, state_dict=state_dict, safe_serialization=True
        )
    accelerator.wait_for_everyone()


def _cell(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _markdown_table(rows: Mapping[str, Any]) -> str:
    lines = ["| | |", "|---|---|"]
    lines += [f"| {key} | {_cell(value)} |" for key, value in rows.items()]
    return "\n".join(lines)


def render_model_card(
    title: str,
    description: str,
    sections: Mapping[str, Mapping[str, Any]],
    tags: Iterable[str] = (),
    datasets: Iterable[str] = (),
    usage: str | None = None,
    figures: Iterable[str] = (),
    library_name: str = "transformers",
) -> str:
    """A Hub model card: YAML metadata, a description, a usage snippet, one table per section, figures."""
    metadata = ["---", f"library_name: {library_name}", "license: apache-2.0"]
    metadata += ["tags:"] + [f"- {tag}" for tag in tags]
    datasets = list(datasets)
    if datasets:
        metadata += ["datasets:"] + [f"- {name}" for name in datasets]
    metadata.append("---")
    parts = ["\n".join(metadata), f"# {title}", description]
    if usage:
        parts.append(f"## Usage\n\n```python\n{usage.strip()}\n```")
    parts += [f"## {heading}\n\n{_markdown_table(rows)}" for heading, rows in sections.items()]
    parts += [f"![{name}]({name})" for name in figures]
    return "\n\n".join(parts) + "\n"


def hub_dataset_ids(dataset_name: str | None) -> list[str]:
    """The card's `datasets:` metadata: the data set when it is a Hub id ("org/name"), not a local folder."""
    if dataset_name is None or "/" not in dataset_name or pathlib.Path(dataset_name).expanduser().exists():
        return []
    return [dataset_name]


def write_model_card(output_dir: str | os.PathLike[str], card: str) -> pathlib.Path:
    path = pathlib.Path(output_dir) / "README.md"
    path.write_text(card)
    return path


def default_repo_name(output_dir: str | os.PathLike[str]) -> str:
    return pathlib.Path(output_dir).resolve().name


class HubUploader:
    """Creates the Hub repository once, then uploads the export folder, in the background when asked.

    At most one upload is in flight: `upload` first waits for the previous one, because the caller rewrites the
    folder's files before each upload.
    """

    def __init__(self, repo_id: str, token: str | None = None, private: bool = False) -> None:
        self.api = HfApi(token=token)
        self.repo_id = self.api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        self._pending: Future[Any] | None = None

    def upload(self, folder: str | os.PathLike[str], commit_message: str, background: bool = False) -> None:
        self.wait()
        result = self.api.upload_folder(
            repo_id=self.repo_id,
            folder_path=str(folder),
            commit_message=commit_message,
            ignore_patterns=UPLOAD_IGNORE_PATTERNS,
            run_as_future=background,
        )
        if background:
            self._pending = result
        logger.info("Uploading %s to %s (%s)", folder, self.repo_id, "background" if background else "done")

    def wait(self) -> None:
        """Block until the background upload (if any) is done; re-raises its error."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()
