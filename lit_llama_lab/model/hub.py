"""Hub models and datasets: downloaded only when the hub answers; offline, the cached copy or one clear message.

Without this, a hub id on a machine without a network retries for about 50 seconds before transformers says it
could not connect. Here one request with a short timeout asks the hub first (``HF_ENDPOINT`` and proxies
respected). ``HF_HUB_OFFLINE=1`` skips the question and uses the hub cache only.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

from lit_llama_lab.model.source import ACCEPTED_FORMS, ModelNotFoundError

log = logging.getLogger(__name__)
PROBE_TIMEOUT_S = 10.0


class HubUnavailableError(ModelNotFoundError):
    """A hub id that cannot be downloaded here (offline, or no such repository); the message names the fix."""


def offline_flag() -> bool:
    """Whether ``HF_HUB_OFFLINE`` (or ``HF_DATASETS_OFFLINE``) asks for the hub cache only."""
    flags = (os.environ.get(name, "").strip().lower() for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    return any(flag in ("1", "true", "yes", "on") for flag in flags)


def hub_cache() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def endpoint() -> str:
    from huggingface_hub import constants

    return str(constants.ENDPOINT)


def cached_snapshot(repo_id: str) -> Path | None:
    """The hub cache's snapshot folder of model ``repo_id`` (with its config.json), if it was downloaded before."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, "config.json")
    return Path(found).parent if isinstance(found, str) else None


def unreachable(repo_id: str, repo_type: str = "model", timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """None when the hub answers about ``repo_id``; the connection error's text when it cannot be reached.

    Raises :class:`HubUnavailableError` when the hub answers that there is no such (public) repository.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, RepositoryNotFoundError

    api = HfApi()
    ask = api.model_info if repo_type == "model" else api.dataset_info
    try:
        ask(repo_id, timeout=timeout)
    except HFValidationError as error:
        raise HubUnavailableError(f"{repo_id!r} is no valid hub id ({error}) and no such local file or folder exists. "
                                  f"Accepted forms: {ACCEPTED_FORMS}.") from error
    except RepositoryNotFoundError as error:
        raise HubUnavailableError(
            f"The hub has no {repo_type} {repo_id!r} (or it is private or gated: log in with `hf auth login`). "
            f"It was taken for a hub id because no such local file or folder exists. Accepted forms: {ACCEPTED_FORMS}."
        ) from error
    except HfHubHTTPError:
        return None  # the hub answered (an error the download itself will report)
    except Exception as error:  # noqa: BLE001 - connection refused, DNS failure, timeout, proxy: all "unreachable"
        return f"{type(error).__name__}: {error}"
    return None


@functools.lru_cache(maxsize=32)
def hub_model_location(repo_id: str) -> str:
    """Where to load hub model ``repo_id`` from: the id itself when the hub answers, else its cached snapshot folder.

    Raises :class:`HubUnavailableError`, naming the offline fact and the fix, when neither is possible.
    """
    cached = cached_snapshot(repo_id)
    if offline_flag():
        if cached is not None:
            return str(cached)
        raise HubUnavailableError(
            f"Hub model {repo_id!r} is not in the hub cache ({hub_cache()}) and HF_HUB_OFFLINE is set, so it cannot be "
            f"downloaded. Unset HF_HUB_OFFLINE where the network is on, or use a local form: {ACCEPTED_FORMS}."
        )
    reason = unreachable(repo_id)
    if reason is None:
        return repo_id
    if cached is not None:
        log.warning("The hub (%s) cannot be reached (%s): using the cached copy of %s at %s.", endpoint(), reason,
                    repo_id, cached)
        return str(cached)
    raise HubUnavailableError(
        f"Cannot download hub model {repo_id!r}: {endpoint()} cannot be reached ({reason}), so this machine looks "
        f"offline, and the model is not in the hub cache ({hub_cache()}). Use a local form instead: {ACCEPTED_FORMS}; "
        "or run where the network is on (a typo in a local path also lands here: check it exists)."
    )


def check_hub_dataset(repo_id: str) -> None:
    """Fail at once, naming the offline fact, when hub dataset ``repo_id`` cannot be downloaded (unless
    ``HF_HUB_OFFLINE`` asks for the cache, which ``datasets`` then reads)."""
    if offline_flag():
        return
    reason = unreachable(repo_id, "dataset")
    if reason is not None:
        raise HubUnavailableError(
            f"Cannot download hub dataset {repo_id!r}: {endpoint()} cannot be reached ({reason}), so this machine "
            "looks offline. Download it once where the network is on and pass --data.source path/to/local/files, or "
            "set HF_HUB_OFFLINE=1 to use a copy already in the hub cache."
        )
