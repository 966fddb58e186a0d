"""Models named by a Hugging Face hub id (`BAAI/bge-small-en-v1.5`) rather than a folder, as
Xinference users start them: the hf provider finds the model in huggingface_hub's cache
(`HF_HUB_CACHE`), downloading it there first unless the model entry says `offline = true` or
`HF_HUB_OFFLINE=1` forbids it.
"""

from __future__ import annotations

import re
from pathlib import Path

from .errors import ProviderUnavailable

#: `owner/name`, as the hub spells a model's id.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def is_hub_id(path: str) -> bool:
    """A `path` (or model name) that names a hub model: `owner/name`, and no such local folder."""
    return bool(_HUB_ID.fullmatch(path)) and not Path(path).exists()


def local_folder(model: str, repo_id: str, *, offline: bool, revision: str | None = None) -> Path:
    """The folder of `repo_id` in huggingface_hub's cache, downloaded first unless offline;
    ProviderUnavailable naming the id and the cache folder when it is not there and cannot be."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    offline = offline or constants.HF_HUB_OFFLINE
    try:
        return Path(snapshot_download(repo_id, revision=revision, local_files_only=offline))
    except (LocalEntryNotFoundError, OfflineModeIsEnabled):
        how = ("downloads are off (offline = true or HF_HUB_OFFLINE=1)" if offline
               else "it could not be downloaded")
        raise ProviderUnavailable(
            f"model '{model}': hub model '{repo_id}' is not in the cache folder {constants.HF_HUB_CACHE} "
            f"and {how}; fetch it where the hub is reachable (`hf download {repo_id}`) and copy "
            "the cache, or give a local folder as `path`", model=model) from None
    except HfHubHTTPError as exc:
        raise ProviderUnavailable(f"model '{model}': hub model '{repo_id}' could not be downloaded: "
                                  f"{exc}", model=model) from None
