"""Hugging Face Hub ids as models: `org/name` -> that repository's config.json, from the local cache or the Hub.

Only config.json is ever fetched, never weights. huggingface_hub is imported inside the functions that need
it: the planner and the estimator start without it, and a preset or a path never loads it.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Collection
from pathlib import Path

from memtui.engine.errors import InputError
from memtui.engine.model.architectures import ModelSpec, load_config_file

# A Hub repository id with its namespace, "meta-llama/Llama-3.1-8B", as huggingface_hub validates them: each part
# starts and ends with a letter, digit or "_"; "--", ".." and more than 96 characters are refused.
_HUB_ID = re.compile(r"\w(?:[\w.-]*\w)?/\w(?:[\w.-]*\w)?", re.ASCII)
_CONFIG = "config.json"
# Every refusal ends with the two ways out: a file, or a token for a gated or private repository.
_WAYS_OUT = "give --model PATH to a config.json, or set HF_TOKEN if the repository is gated or private"


def is_hub_id(name: str) -> bool:
    """Shaped like `org/name` (says nothing about whether that repository exists)."""
    return (bool(_HUB_ID.fullmatch(name)) and len(name) <= 96 and "--" not in name and ".." not in name
            and not name.endswith(".json"))


def names_hub_repo(name: str, presets: Collection[str]) -> bool:
    """`name` is to be looked up on the Hub: an `org/name` id that is neither a preset nor an existing path."""
    return name not in presets and is_hub_id(name) and not Path(name).expanduser().exists()


def hub_cache_dir() -> Path:
    """The Hub cache as huggingface_hub finds it, read now (its constants froze the environment at import)."""
    cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if cache:
        return Path(os.path.expandvars(cache)).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(os.path.expandvars(home)).expanduser() / "hub"


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) set to a true value, as huggingface_hub reads it."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.upper() in {"1", "ON", "YES", "TRUE"}


def cached_config_path(repo_id: str) -> Path | None:
    """config.json of `repo_id` at refs/main in the local cache, or None; never touches the network."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, _CONFIG, cache_dir=hub_cache_dir())
    return Path(found) if isinstance(found, str) else None  # the other answers: not cached, or a cached 404


def hub_config_path(repo_id: str) -> Path:
    """config.json of `repo_id`: from the local cache, else downloaded (that one file) unless offline."""
    cached = cached_config_path(repo_id)
    if cached is not None:
        return cached
    cache = hub_cache_dir()
    if hub_offline():
        raise InputError("model", f"{repo_id!r} is not in the Hugging Face cache ({cache}) and HF_HUB_OFFLINE "
                                  f"forbids downloading its config.json; {_WAYS_OUT}")
    return _download_config(repo_id, cache)


def _download_config(repo_id: str, cache: Path) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    hub_log.setLevel(logging.ERROR)  # its retry warnings would break the one-line error
    try:
        return Path(hf_hub_download(repo_id, _CONFIG, cache_dir=cache))
    except LocalEntryNotFoundError:  # what huggingface_hub raises when the Hub cannot be reached
        raise InputError("model", f"could not reach the Hub for config.json of {repo_id!r}, and it is not in the "
                                  f"Hugging Face cache ({cache}); {_WAYS_OUT}") from None
    except GatedRepoError:
        reason = "is gated: accept its terms on huggingface.co and set HF_TOKEN, or give --model PATH to a config.json"
        raise InputError("model", f"{repo_id!r} {reason}") from None
    except RepositoryNotFoundError:  # the Hub answers 401 for a private repository and a missing one alike
        raise InputError("model", f"no Hub repository {repo_id!r} that this token may read; {_WAYS_OUT}") from None
    except (EntryNotFoundError, RevisionNotFoundError):
        raise InputError("model", f"{repo_id!r} has no config.json on its main branch; {_WAYS_OUT}") from None
    except HfHubHTTPError as error:
        status = getattr(getattr(error, "response", None), "status_code", None)
        raise InputError("model", f"the Hub refused config.json of {repo_id!r} (HTTP {status}); {_WAYS_OUT}") from None
    except OSError as error:  # no network, a proxy, a full disk
        detail = " ".join(str(error).split())  # one line, whatever the error says
        raise InputError("model", f"could not download config.json of {repo_id!r} "
                                  f"({type(error).__name__}: {detail}); {_WAYS_OUT}") from None
    finally:
        hub_log.setLevel(level)


def load_hub_model(repo_id: str) -> ModelSpec:
    """The model a Hub id names; the id is what the user sees."""
    return load_config_file(hub_config_path(repo_id), model_id=repo_id)


def cached_model_ids() -> list[str]:
    """`org/name` of every model repository in the local cache with a config.json snapshot.

    Folder names and one glob per repository, no file read: cheap enough for the palette's start-up.
    """
    try:
        entries = sorted(os.scandir(hub_cache_dir()), key=lambda entry: entry.name.lower())
    except OSError:
        return []
    ids = []
    for entry in entries:
        repo_id = entry.name.removeprefix("models--").replace("--", "/")
        if entry.name.startswith("models--") and is_hub_id(repo_id) and entry.is_dir():
            if next(Path(entry.path).glob(f"snapshots/*/{_CONFIG}"), None) is not None:
                ids.append(repo_id)
    return ids
