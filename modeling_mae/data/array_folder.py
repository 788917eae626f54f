"""A folder of ``.npy`` files, streamed as an image folder: ``[split/]class_name/xxx.npy``.

`datasets` has no builder for ``.npy`` files (its image folder lists image formats only). `ArrayFolder` is its image
folder builder listing ``.npy`` files instead: the same splits (``train/``, ``val/``, ... folders), the same class
labels from the folder names, and the same ``image`` column of ``{"path", "bytes"}`` values, whose file the stream
reads and `channels` decodes (the ``.npy`` magic tells an array's bytes from an encoded image's).
"""

from __future__ import annotations

import pathlib

from datasets.data_files import DataFilesDict, get_data_patterns
from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder

ARRAY_SUFFIX = ".npy"


class ArrayFolder(ImageFolder):
    """`datasets`' image folder builder, listing ``.npy`` files."""

    EXTENSIONS = [ARRAY_SUFFIX]  # noqa: RUF012 - the base class's attribute, read by its file filter


def array_folder_builder(folder: pathlib.Path) -> ArrayFolder:
    """The builder of a local folder of ``.npy`` files, its splits found as `datasets` finds an image folder's."""
    base = str(folder.resolve())
    files = DataFilesDict.from_patterns(get_data_patterns(base), base_path=base, allowed_extensions=[ARRAY_SUFFIX])
    return ArrayFolder(data_files=files, dataset_name=folder.name, base_path=base)
