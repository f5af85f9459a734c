"""Helpers shared by the test files: ports, tar shards, image bytes, model batches, one intra-op thread.

Test files import the functions (`from conftest import free_port`; pytest puts tests/ on sys.path, and so
do the spawned and torchrun workers that import a test file) and use the fixtures by name.
"""

from __future__ import annotations

import io
import os
import socket
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image


def free_port() -> int:
    """A TCP port on localhost that nothing listens on right now (for MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_tars(directory: str | os.PathLike) -> dict[str, dict[str, bytes]]:
    """{key: {extension: bytes}} over every .tar shard in `directory`, shards in name order."""
    samples: dict[str, dict[str, bytes]] = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".tar"):
            with tarfile.open(os.path.join(directory, name)) as tar:
                for m in tar.getmembers():
                    key, ext = m.name.split(".", 1)
                    samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return samples


def image_bytes(image: np.ndarray | tuple[int, int, int], fmt: str = "PNG", size=(24, 20)) -> bytes:
    """An encoded image: `image` is (H, W, 3) uint8 pixels, or an RGB colour filling a `size` (w, h) image.
    PNG is lossless, so a test can compare decoded pixels exactly."""
    img = Image.fromarray(image) if isinstance(image, np.ndarray) else Image.new("RGB", size, image)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def decode(data: bytes) -> np.ndarray:
    """(H, W, 3) int pixels of encoded image bytes (int: differences do not wrap around)."""
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)


def make_batch(cfg, B: int = 2, L: int = 12, seed: int = 0) -> dict:
    """A model batch for an EVEConfig: random images (B, C, S, S) and captions [CLS] w ... w [SEP] of
    different lengths (odd samples padded by 3, id 0 where text_mask is 0), text_ids / text_mask (B, L)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(200, min(cfg.vocab_size, 2000), (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    for i in range(B):
        n = L - 3 * (i % 2)
        ids[i, 0], ids[i, n - 1] = 101, 102
        ids[i, n:], mask[i, n:] = 0, 0
    image = torch.randn(B, cfg.in_chans, cfg.image_size, cfg.image_size, generator=g)
    return {"image": image, "text_ids": ids, "text_mask": mask}


def open_gates(model, value: float = 2.0):
    """An EVLM model with every cross-attention gate set to `value` (they start at 0, where the images change
    nothing): the images steer the tokens. -> the model."""
    for layer in model.layers:
        layer.xattn.attn_gate.data.fill_(value)
        layer.xattn.ff_gate.data.fill_(value)
    return model


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one intra-op thread is faster than two, a lot faster on a shared, loaded CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _restore_root_logger():
    """In-process runs call `setup_logging`, which puts handlers on the root logger: each test starts and
    ends with the root logger as it was, so one test's console handler and level do not reach the next."""
    import logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
