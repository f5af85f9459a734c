"""Throughput of the training input pipeline against a bare JPEG decode + crop loop over the same images."""

from __future__ import annotations

import io
import itertools
import os
import time

import torch
from PIL import Image
from torchvision.transforms import RandomResizedCrop

from eve_ds.data.config import CorpusConfig, DataConfig
from eve_ds.data.manifest import expand_spec
from eve_ds.data.pipeline import build_train_loader, load_tokenizer
from eve_ds.data.stream import read_shard
from eve_ds.data.transforms import IMAGE_KEYS
from eve_ds.utils.markdown import table


def load_jpegs(spec: str, n: int) -> list[bytes]:
    """The first n image byte strings of the shards (cycled if there are fewer)."""
    images = [next(s[k] for k in IMAGE_KEYS if k in s) for url in expand_spec(spec) for s in read_shard(url)]
    return list(itertools.islice(itertools.cycle(images), n))


def bare_rate(jpegs: list[bytes], image_size: int, scale: tuple[float, float]) -> float:
    """Samples/s of the textbook loop: full decode to RGB, torchvision RandomResizedCrop, to tensor."""
    crop = RandomResizedCrop(image_size, scale=scale)
    start = time.perf_counter()
    for b in jpegs:
        img = crop(Image.open(io.BytesIO(b)).convert("RGB"))
        torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
    return len(jpegs) / (time.perf_counter() - start)


def pipeline_rate(
    spec: str, workers: int, *, image_size: int, batch_size: int, num_batches: int, tokenizer
) -> float:
    """Samples/s of build_train_loader (decode, augment, tokenize, collate), after one warm-up batch per worker."""
    cfg = DataConfig(train=[CorpusConfig("bench", spec)], num_workers=workers)
    loader = build_train_loader(
        cfg,
        image_size=image_size,
        max_text_len=40,
        batch_size=batch_size,
        rank=0,
        world_size=1,
        seed=0,
        tokenizer=tokenizer,
    )
    batches = iter(loader)
    for _ in range(max(workers, 1)):  # worker start-up is not throughput
        next(batches)
    start = time.perf_counter()
    for _ in range(num_batches):
        next(batches)
    return num_batches * batch_size / (time.perf_counter() - start)


def run(spec: str, workers: int, *, image_size: int, batch_size: int, num_batches: int) -> dict:
    tokenizer = load_tokenizer()
    scale = DataConfig(synthetic=True).crop_scale
    bare = bare_rate(load_jpegs(spec, batch_size * num_batches), image_size, scale)
    rows = [{"setting": "bare decode + crop (main process)", "workers": 0, "samples_per_s": bare}]
    for w in sorted({0, 1, workers}):  # 0: in the main process, no inter-process transfer of batches
        rate = pipeline_rate(
            spec,
            w,
            image_size=image_size,
            batch_size=batch_size,
            num_batches=num_batches,
            tokenizer=tokenizer,
        )
        rows.append({"setting": "full pipeline", "workers": w, "samples_per_s": rate})
    for r in rows:
        r["vs_bare"] = r["samples_per_s"] / bare
    return {
        "shards": spec,
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(),
        "image_size": image_size,
        "batch_size": batch_size,
        "num_batches": num_batches,
        "torch_threads": torch.get_num_threads(),
        "rows": rows,
    }


def markdown(result: dict) -> str:
    rows = (
        [r["setting"], r["workers"], f"{r['samples_per_s']:.0f}", f"{r['vs_bare']:.2f}"]
        for r in result["rows"]
    )
    head = (
        f"shards `{result['shards']}`, image_size {result['image_size']}, batch {result['batch_size']} x "
        f"{result['num_batches']} batches"
    )
    return "\n".join([head, "", table(["setting", "workers", "samples/s", "vs bare"], rows)])
