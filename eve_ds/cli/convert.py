"""`eve-convert`: export, reshard and import EVE checkpoints.

    eve-convert export SRC DST [--dtype fp32|bf16] [--format native|hf]
    eve-convert reshard SRC DST --ep-size B [--world-size W] [--strict-optimizer]
    eve-convert import-beitv2 SRC DST --model eve_base|eve_large [--bert BERT_STATE_DICT]
    eve-convert import-official SRC DST [--tokenizer DIR] [--answer-list FILE] [--set KEY=VALUE ...]

SRC of export/reshard: a run dir (its checkpoints/latest), a checkpoints dir or a DeepSpeed tag dir
(export also takes a native export). DST is written next to itself first and renamed when complete.
"""

from __future__ import annotations

import argparse
import logging

from eve_ds.utils.errors import cli_main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="eve-convert",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export", help="DeepSpeed checkpoint -> one consolidated folder")
    e.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    e.add_argument("--format", default="native", choices=["native", "hf"], dest="fmt")
    r = sub.add_parser("reshard", help="DeepSpeed checkpoint -> run dir for another ep_size / world size")
    r.add_argument("--ep-size", type=int, required=True)
    r.add_argument(
        "--world-size", type=int, default=None, help="target data-parallel size (default: the source's)"
    )
    r.add_argument(
        "--strict-optimizer",
        action="store_true",
        help="fail instead of dropping optimizer state that cannot be resharded",
    )
    b = sub.add_parser("import-beitv2", help="timm BEiT v2 state dict -> EVE initial weights (native export)")
    b.add_argument("--model", default="eve_base", choices=["eve_tiny", "eve_base", "eve_large"])
    b.add_argument("--bert", default=None, help="HF BertModel state dict: word + position embeddings")
    b.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    o = add_import_official(sub)
    for s in (e, r, b, o):
        s.add_argument("src")
        s.add_argument("dst")
        s.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    return p.parse_args(argv)


# -- import-official ---------------------------------------------------------------------------------


def add_import_official(sub) -> argparse.ArgumentParser:
    o = sub.add_parser("import-official", help="official EVE checkpoint (ssyze/EVE) -> native export")
    o.add_argument("--tokenizer", default=None, help="local tokenizer folder (AutoTokenizer) to carry along")
    o.add_argument("--answer-list", default=None, help="VQA: X-VLM's answer_list.json (the head's order)")
    o.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="model.KEY / objective.KEY override"
    )
    o.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    return o


def run_import_official(args: argparse.Namespace) -> None:
    from eve_ds.convert.official import import_official

    report = import_official(
        args.src, args.dst, args.tokenizer, args.answer_list, args.set, args.dtype, args.overwrite
    )
    print(f"heads mapped: {report['heads'] or 'none (pre-trained)'}")
    for key, why in report["not_mapped"].items():
        print(f"not mapped: {key}: {why}")
    print(f"ignored keys ({len(report['ignored'])}): {report['ignored'][:10]}")
    print("a run config builds this model with: " + " ".join(report["run_overrides"]))


# -------------------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> None:
    from eve_ds.convert import export, import_beitv2, reshard

    if args.cmd == "import-official":
        run_import_official(args)
    elif args.cmd == "export":
        from eve_ds.infer.preprocess import hf_text_rule

        export(
            args.src,
            args.dst,
            dtype=args.dtype,
            fmt=args.fmt,
            overwrite=args.overwrite,
            text_rule=hf_text_rule,
        )
    elif args.cmd == "reshard":
        reshard(
            args.src,
            args.dst,
            args.ep_size,
            world_size=args.world_size,
            strict_optimizer=args.strict_optimizer,
            overwrite=args.overwrite,
        )
    else:
        import_beitv2(
            args.src, args.dst, model=args.model, bert=args.bert, dtype=args.dtype, overwrite=args.overwrite
        )


@cli_main("eve-convert", user_errors=(FileExistsError,))  # ConvertError is a UserError; DST in the way
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not logging.getLogger().handlers:  # leave a caller's (or pytest's) logging alone
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
        )
    run(args)
    print(f"wrote {args.dst}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
