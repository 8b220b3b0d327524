"""Finding the base model's config.json for a saved adapter, without network access.

An adapter records its base in ``adapter_config.json`` as ``base_model_name_or_path``: a local folder or a hub id.
Conversions need the base's expert dims and model type; for a hub id they are read from the local Hugging Face cache
(the same lookup transformers does with ``local_files_only=True``), never downloaded: a conversion tool that silently
reaches the network is surprising on an air-gapped training machine, and the config must be the one the adapter was
trained on, which is the one already cached there.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ..files import read_json

log = logging.getLogger("shims")

_CONFIG_NAME = "config.json"


class BaseConfigNotFound(FileNotFoundError):
    """The base model's config.json is neither given, nor a local folder, nor in the local Hugging Face cache."""


def load_base_config(base_config=None, adapter_config: dict | None = None, required: bool = False) -> dict | None:
    """The base model config as a dict.

    ``base_config``: a dict, a transformers config, a folder holding config.json, a config.json path, or a hub id
    (looked up in the local cache). Without it, the adapter's ``base_model_name_or_path`` is tried the same way.
    Returns None when nothing is found, or raises :class:`BaseConfigNotFound` (naming what was tried) when
    ``required``.
    """
    source = base_config
    if source is None and adapter_config:
        source = adapter_config.get("base_model_name_or_path")
    if source is None:
        return _missing("no base_config given and the adapter records no base_model_name_or_path", required)
    if isinstance(source, dict):
        return source
    if hasattr(source, "to_dict"):  # a transformers PretrainedConfig
        return source.to_dict()
    path = Path(source)
    if path.is_dir() and (path / _CONFIG_NAME).is_file():
        return read_json(path / _CONFIG_NAME)
    if path.is_file():
        return read_json(path)
    cached = cached_hub_config(str(source))
    if cached is not None:
        log.debug("base config of %s read from the local Hugging Face cache: %s", source, cached)
        return read_json(cached)
    return _missing(f"base model {str(source)!r} is not a local folder with {_CONFIG_NAME} and its {_CONFIG_NAME} "
                    f"is not in the local Hugging Face cache ({_hub_cache_dir()}); download it (huggingface-cli "
                    f"download {source} {_CONFIG_NAME}) or pass base_config= a folder or config.json", required)


def cached_hub_config(repo_id: str, revision: str | None = None) -> str | None:
    """Path of ``repo_id``'s config.json in the local Hugging Face cache, or None; never touches the network."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.utils import HFValidationError

    try:
        found = try_to_load_from_cache(repo_id, _CONFIG_NAME, revision=revision)
    except HFValidationError:  # not a valid repo id (e.g. a path that does not exist): nothing to look up
        return None
    # a str is a cached file; None means not cached, a sentinel object that the hub said it does not exist
    return found if isinstance(found, str) else None


def _hub_cache_dir() -> str:
    from huggingface_hub import constants

    return os.fspath(constants.HF_HUB_CACHE)


def _missing(why: str, required: bool):
    if required:
        raise BaseConfigNotFound(why)
    log.debug("shims: base config not found: %s", why)
    return None
