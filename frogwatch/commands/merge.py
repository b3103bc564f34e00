"""``frogwatch merge BASE_DIR DELTA OUT_DIR``: merge a FROG delta into a checkpoint, shard by shard."""

from __future__ import annotations


def add_parser(sub):
    p = sub.add_parser(
        "merge",
        help="merge a FROG delta file into a safetensors checkpoint (one shard in memory at a time)",
    )
    p.add_argument("base_dir", metavar="BASE_DIR",
                   help="checkpoint directory: model.safetensors.index.json and shards, or .safetensors")
    p.add_argument("delta", metavar="DELTA", help="delta file written by frogwatch.save_delta")
    p.add_argument("out_dir", metavar="OUT_DIR", help="new directory for the merged checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def run(args) -> int:
    from ..frog.checkpoint import merge_checkpoint

    try:
        out = merge_checkpoint(args.base_dir, args.delta, args.out_dir, progress=not args.quiet)
    except FileExistsError as e:
        raise ValueError(str(e)) from None
    print(f"wrote {out}")
    return 0
