"""EVE-DS: open pre-training for EVE (masked signal modeling + modality-aware MoE) on DeepSpeed."""

from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py


class BuildPyWithDSConfigs(build_py):
    """Ships the top-level ds_configs/*.json as the package data eve_ds/ds_configs/ of a wheel. The tree
    keeps them in one place, where the design card puts them; an editable install reads them there
    (eve_ds.utils.paths.ds_config_dir), so nothing is copied into the source tree."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):  # setuptools >= 64 builds editable wheels through here
            return
        target = Path(self.build_lib, "eve_ds", "ds_configs")
        self.mkpath(str(target))
        for src in sorted(Path(__file__).resolve().parent.joinpath("ds_configs").glob("*.json")):
            self.copy_file(str(src), str(target / src.name))


setup(
    name="eve-ds",
    version="0.1.0",
    description="Pre-training EVE (AAAI 2024) with DeepSpeed ZeRO-2 and expert parallelism",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["eve_ds", "eve_ds.*"]),
    package_data={"eve_ds": ["configs/*.yaml", "assets/bert-base-uncased/*"]},
    cmdclass={"build_py": BuildPyWithDSConfigs},
    install_requires=[
        "torch>=2.3",
        "torchvision",
        # DeepSpeed's MoE gate interface changed in 0.19.4 (TopKGate/top2gating signatures); built against 0.19.8.
        "deepspeed>=0.19.4,<0.20",
        "transformers>=4.40",
        "timm>=1.0",
        "webdataset>=0.2.86",
        "accelerate>=0.30",
        "pyyaml>=6",
        "wandb>=0.17",
        "safetensors>=0.4",
        "pillow>=10",
        "numpy",
        "tqdm",
        "matplotlib>=3.7",  # eve-explain figures
        "pycocoevalcap>=1.2",  # CIDEr-D and BLEU-4 of the EVLM demonstration
    ],
    extras_require={"dev": ["pytest>=8", "ruff>=0.6"]},
    entry_points={
        "console_scripts": [
            "eve-pretrain=eve_ds.cli.pretrain:main",
            "eve-finetune=eve_ds.cli.finetune:main",
            "eve-evaluate=eve_ds.cli.evaluate:main",
            "eve-info=eve_ds.cli.info:main",
            "eve-convert=eve_ds.cli.convert:main",
            "eve-bench=eve_ds.cli.bench:main",
            "eve-profile=eve_ds.cli.profile:main",
            "eve-ablations=eve_ds.cli.ablations:main",
            "eve-make-shards=eve_ds.cli.make_shards:main",
            "eve-make-synthetic=eve_ds.cli.make_synthetic:main",
            "eve-bench-data=eve_ds.cli.bench_data:main",
            "eve-bench-finetune=eve_ds.cli.bench_finetune:main",
            "eve-report=eve_ds.cli.reproduce:main",
            "eve-reproduce=eve_ds.cli.reproduce:reproduce_main",
            "eve-predict=eve_ds.cli.predict:main",
            "eve-explain=eve_ds.cli.explain:main",
            "eve-bench-inference=eve_ds.cli.bench_inference:main",
        ]
    },
)
