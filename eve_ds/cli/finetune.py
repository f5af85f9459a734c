"""`eve-finetune`: fine-tune a pre-trained EVE on a downstream task with the pre-training trainer.

eve-finetune                                            # VQA on the synthetic set, CPU: a first run
eve-finetune --config vqa_tiny_synthetic train.init_from=runs/eve_tiny_synthetic
eve-finetune --config vqa_eve_base --run-dir runs/vqa train.init_from=runs/eve_base_4m task.data_root=/data/vqa
"""

from __future__ import annotations

from eve_ds.cli.pretrain import parse_args, run
from eve_ds.utils.errors import cli_main


@cli_main("eve-finetune")
def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv, prog="eve-finetune", default_config="vqa_tiny_synthetic"))


if __name__ == "__main__":
    raise SystemExit(main())
