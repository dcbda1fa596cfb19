"""The Hugging Face hub as seen from here: offline switch, a quick reachability probe, and a
cache lookup that never touches the network (assembly ring; used by regft.models for CLIP weights
and regft.generators for diffusion pipelines).

The probe exists so that a missing model fails in seconds with a one-line message, instead of a
minute of hub retries and a traceback.
"""
from __future__ import annotations

import os
import socket

from huggingface_hub import hf_hub_download

HUB_HOST = ("huggingface.co", 443)
REACHABLE_TIMEOUT_S = 3.0  # one TCP connect: long enough for a slow link, short enough to fail fast
# open_clip's weight file names on the hub, newest format first
OPEN_CLIP_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def hub_reachable(timeout: float = REACHABLE_TIMEOUT_S) -> bool:
    if hub_offline():
        return False
    try:
        with socket.create_connection(HUB_HOST, timeout=timeout):
            return True
    except OSError:
        return False


def cached_open_clip_checkpoint(hf_hub: str, cache_dir: str | None) -> str | None:
    """Path of the cached weights file for an open_clip 'org/repo/[file]' hub entry, if any."""
    model_id, filename = os.path.split(hf_hub.rstrip("/") if hf_hub.endswith("/") else hf_hub)
    if hf_hub.endswith("/"):
        model_id, filename = hf_hub.rstrip("/"), ""
    names = [filename] if filename else []
    names += list(OPEN_CLIP_WEIGHT_FILES)
    for name in names:
        try:
            return hf_hub_download(model_id, name, cache_dir=cache_dir, local_files_only=True)
        except Exception:  # not cached (or hub lib refuses offline): try the next name
            continue
    return None
