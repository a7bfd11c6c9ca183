"""Downloads from the Hugging Face Hub, with errors that say what to do.

`huggingface_hub` does the work: its cache (files are written to a temporary
`.incomplete` name and renamed when complete, so an interrupted download
leaves no corrupt cache entry and resumes on the next call), `HF_TOKEN` or
the stored login, and offline mode (`HF_HUB_OFFLINE=1`). This module never
reads, prints or stores a token.
"""

import socket
import urllib.parse

import huggingface_hub
import huggingface_hub.constants
from huggingface_hub import errors as hub_errors

from keras_paligemma2.utils.tensor_files import CheckpointError


class DownloadError(CheckpointError):
    """A file that could not be had from the Hub, and what to do about it."""


def _licence_hint(repo_id):
    return (
        f"PaliGemma 2 is gated: accept the Gemma licence on "
        f"https://huggingface.co/{repo_id} with your Hugging Face account, "
        "then log in on this machine (`hf auth login`, or `huggingface-cli "
        "login`) or set the HF_TOKEN environment variable."
    )


def _explain(error, repo_id, what, command):
    # Most specific first: GatedRepoError is a RepositoryNotFoundError, and
    # LocalEntryNotFoundError an EntryNotFoundError.
    if isinstance(error, hub_errors.GatedRepoError):
        return DownloadError(
            f"Access to {repo_id} was refused while fetching {what}. " + _licence_hint(repo_id)
        )
    if isinstance(error, hub_errors.RepositoryNotFoundError):
        return DownloadError(
            f"{repo_id} was not found, or is not visible to you, while "
            f"fetching {what}. If it exists it is gated: " + _licence_hint(repo_id)
        )
    if isinstance(error, hub_errors.RevisionNotFoundError):
        return DownloadError(f"{repo_id} has no such revision ({what}).")
    if isinstance(error, hub_errors.LocalEntryNotFoundError):
        return DownloadError(
            f"Could not download {what} from {repo_id}: there is no network "
            "(or HF_HUB_OFFLINE=1 is set) and it is not in the Hugging Face "
            f"cache. On a machine with access, run `{command}` and copy the "
            "cache (~/.cache/huggingface/hub), or pass a local path instead "
            "of the preset name."
        )
    if isinstance(error, hub_errors.EntryNotFoundError):
        return DownloadError(f"{repo_id} has no file {what}.")
    return DownloadError(
        f"Downloading {what} from {repo_id} failed ({type(error).__name__}: "
        f"{error}). Run the same call again: completed files are cached and "
        "an interrupted one resumes."
    )


def hub_reachable(timeout=3.0):
    """Whether the Hub's host takes a TCP connection (one try).

    Without network, huggingface_hub retries with backoff for half a minute
    before failing; when this says no, downloads read the local cache only
    (`local_files_only=True`), which answers at once, from the cache or with
    the "no network" message.

    Args:
        timeout: float, seconds to wait for the connection (default 3).
    """
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        return False
    url = urllib.parse.urlparse(huggingface_hub.constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def download_file(repo_id, filename, revision=None):
    """One file of a Hub repository, from the cache or downloaded; its path.

    Args:
        repo_id: str, the Hub repository, e.g. "google/paligemma2-3b-pt-224".
        filename: str, the file's path inside the repository.
        revision: str or None, a branch, tag or commit (None: the default branch).

    Returns:
        str, the local path of the cached file; a `DownloadError` saying what
        to do if it cannot be had.
    """
    try:
        return huggingface_hub.hf_hub_download(
            repo_id=repo_id,
            filename=filename,
            revision=revision,
            local_files_only=not hub_reachable(),
        )
    except (hub_errors.HfHubHTTPError, hub_errors.EntryNotFoundError, OSError) as error:
        raise _explain(error, repo_id, filename, f"hf download {repo_id} {filename}") from error


def download_repository(repo_id, allow_patterns, revision=None):
    """The files of a Hub repository matching `allow_patterns`; its directory.

    Args:
        repo_id: str, the Hub repository, e.g. "google/paligemma2-3b-pt-224".
        allow_patterns: iterable of str, glob patterns of the files to fetch.
        revision: str or None, a branch, tag or commit (None: the default branch).

    Returns:
        str, the local snapshot directory; a `DownloadError` saying what to do
        if the files cannot be had.
    """
    try:
        return huggingface_hub.snapshot_download(
            repo_id=repo_id,
            allow_patterns=list(allow_patterns),
            revision=revision,
            local_files_only=not hub_reachable(),
        )
    except (hub_errors.HfHubHTTPError, hub_errors.EntryNotFoundError, OSError) as error:
        raise _explain(error, repo_id, "the repository files", f"hf download {repo_id}") from error
