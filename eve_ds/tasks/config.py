"""The `task:` section of a run config: which task a run trains (`msm` = pre-training) and its data.

Sources: [paper] EVE's appendix (fine-tuning recipes); [official] the released EVE fine-tuning code;
[ours] this project's choice.
"""

from __future__ import annotations

from dataclasses import dataclass

from eve_ds.utils.config import check

# EVLM on the public benchmarks (tasks/evlm_bench/): evaluation only, each with its own default split.
BENCHMARK_TASKS = ("vqav2", "gqa", "textvqa", "pope", "mme", "mmbench")
TASK_NAMES = ("msm", "vqa", "retrieval", "nlvr2", "evlm_synthetic", "evlm_packed", *BENCHMARK_TASKS)
# Tasks that read the corpora of the `data:` section (data.train, data.val), not a task.data_root.
CORPUS_TASKS = ("msm", "evlm_packed")
IMAGE_GEOMETRIES = ("square_crop", "official")  # task.image_geometry (read by tasks/base.py decode_image)
IMAGE_AUGMENTS = ("none", "randaugment", "color_jitter")  # task.image_augment
TEXT_PREPROCESS = ("none", "official")  # task.text_preprocess (eve_ds/data/text.py)
BENCH_PROMPTS = ("auto", "plain", "sft", "chat")  # task.bench_prompt (EVLM benchmarks)
# The opt-in row kinds of evlm_synthetic (task.synthetic_extra_kinds; tasks/evlm_synthetic/data.py).
SYNTHETIC_EXTRA_KINDS = ("grounding", "interleaved", "video")


@dataclass
class TaskConfig:
    # msm (pre-training) | vqa | retrieval | nlvr2 | evlm_synthetic (EVLM captions) | evlm_packed (EVLM on
    # packed shards: data.train, data.val) | vqav2, gqa, textvqa, pope, mme, mmbench (EVLM on a benchmark:
    # evaluation only, eve-evaluate --task NAME --data-root DIR)
    name: str = "msm"
    # The dataset's files as distributed (see docs/finetuning.md for each layout); `${VAR}` is expanded.
    data_root: str | None = None
    # Generate the task's synthetic set (shapes scenes, official layout) into data.cache_dir when missing
    # and use it as data_root.
    synthetic: bool = False
    synthetic_seed: int = 0
    synthetic_num_train: int = 2000  # images (VQA, retrieval) or statements (NLVR2)
    synthetic_num_val: int = 300
    synthetic_num_test: int = 300
    # evlm_synthetic: the share of training rows of each opt-in kind [ours] (grounding, interleaved, video;
    # e.g. {grounding: 0.2}); the other rows keep the caption / VQA / POPE mix, and with none (the default)
    # every row is what it is without this key. Their validation metrics come with them.
    synthetic_extra_kinds: dict[str, float] | None = None
    epochs: float = 10.0  # [paper] fine-tuning length; derives train.max_steps when that is null
    # LR multiplier of the new heads ([official] code: 10 VQA / COCO retrieval, 5 Flickr30K, 15 NLVR2; the
    # paper says nothing)
    head_lr_mult: float = 1.0
    # How images become S x S (IMAGE_GEOMETRIES in tasks/base.py): square_crop [ours] the centre square, in
    # training and evaluation; official [official] the whole image resized (evaluation) and
    # RandomResizedCrop(S, scale (0.5, 1), bicubic) of it (training).
    image_geometry: str = "square_crop"
    # Training augmentation after the crop, seeded per item and epoch: none | randaugment [official, VQA and
    # NLVR2: the release's RandomAugment(2, 7), geometric and tone operations only (data/augment.py)] |
    # color_jitter [official, retrieval: torchvision's ColorJitter(0.4, 0.4, 0.4)].
    image_augment: str = "none"
    # Text before tokenisation (eve_ds/data/text.py): none [ours] the text as it is | official [official
    # code] lower-cased, punctuation removed, `-` and `/` read as spaces, cut to a word limit (VQA questions
    # 30 words in training and 50 in evaluation, retrieval captions 30, NLVR2 statements 40).
    text_preprocess: str = "none"
    text_max_words: int | None = None  # with official: one limit for every split; null = the official ones
    eval_split: str = "minival"  # split evaluated during and at the end of training
    skip_bad_eval_images: bool = False  # evaluation: skip missing/unreadable images instead of failing
    # VQA v2
    answer_vocab_size: int = 3129  # [paper/official] the standard answer list
    vqa_train_splits: list[str] | None = None  # default: train + val minus the minival images
    minival_images: int = 1000  # [ours] val images held out for model selection
    # Retrieval (COCO / Flickr30K, Karpathy splits)
    dataset: str = "coco"  # coco | flickr30k
    rerank_k: int = 128  # [paper] ITC top-k re-scored by the ITM head
    # NLVR2
    nlvr2_head: str = "biattn"  # biattn ([official] bi-attention head) | concat (MLP on both [CLS])
    # EVLM benchmarks: how a question is laid out around its media tokens [ours] (tasks/evlm_bench/task.py):
    # plain [media] prompt | sft [media] user: prompt assistant: (the layout the SFT rows of
    # data/documents.py train on) | chat the LM tokenizer's own chat template (an instruction-tuned LM
    # evaluated as it is) | auto: sft for a stage3 (SFT) run, else plain.
    bench_prompt: str = "auto"

    def validate(self) -> None:
        check(self.name in TASK_NAMES, "task.name", self.name, f"one of {list(TASK_NAMES)}")
        check(
            self.bench_prompt in BENCH_PROMPTS,
            "task.bench_prompt",
            self.bench_prompt,
            f"one of {list(BENCH_PROMPTS)}",
        )
        extra = self.synthetic_extra_kinds or {}
        check(
            not extra or self.name == "evlm_synthetic",
            "task.synthetic_extra_kinds",
            extra,
            "null: only task evlm_synthetic has opt-in row kinds",
        )
        for kind, share in extra.items():
            check(
                kind in SYNTHETIC_EXTRA_KINDS,
                "task.synthetic_extra_kinds",
                kind,
                f"kinds among {list(SYNTHETIC_EXTRA_KINDS)}",
            )
            check(0 <= share <= 1, f"task.synthetic_extra_kinds.{kind}", share, "a share in [0, 1]")
        check(sum(extra.values()) <= 1, "task.synthetic_extra_kinds", extra, "shares summing to <= 1")
        if self.name in CORPUS_TASKS:
            return
        check(
            self.synthetic or bool(self.data_root),
            "task.data_root",
            self.data_root,
            "the dataset directory (or task.synthetic=true)",
        )
        check(self.epochs > 0, "task.epochs", self.epochs, "> 0")
        check(self.head_lr_mult > 0, "task.head_lr_mult", self.head_lr_mult, "> 0")
        for key, allowed in (("image_geometry", IMAGE_GEOMETRIES), ("image_augment", IMAGE_AUGMENTS)):
            check(getattr(self, key) in allowed, f"task.{key}", getattr(self, key), f"one of {list(allowed)}")
        check(
            self.text_preprocess in TEXT_PREPROCESS,
            "task.text_preprocess",
            self.text_preprocess,
            f"one of {list(TEXT_PREPROCESS)}",
        )
        words = self.text_max_words
        check(words is None or words >= 1, "task.text_max_words", words, "null or >= 1")
        check(self.answer_vocab_size >= 2, "task.answer_vocab_size", self.answer_vocab_size, ">= 2")
        check(self.minival_images >= 0, "task.minival_images", self.minival_images, ">= 0")
        check(self.dataset in ("coco", "flickr30k"), "task.dataset", self.dataset, "coco or flickr30k")
        check(self.rerank_k >= 1, "task.rerank_k", self.rerank_k, ">= 1")
        check(self.nlvr2_head in ("biattn", "concat"), "task.nlvr2_head", self.nlvr2_head, "biattn or concat")
        for key in ("synthetic_num_train", "synthetic_num_val", "synthetic_num_test"):
            check(getattr(self, key) >= 1, f"task.{key}", getattr(self, key), ">= 1")
