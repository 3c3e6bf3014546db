"""`stnpadim synth`: writes an MVTec-format synthetic data set."""
from __future__ import annotations

from ..data.synth import make_dataset
from .outputs import check_writable_folder
from .parser import SYNTH_SIZES


def run(args) -> int:
    check_writable_folder(args.out)  # a file in the way fails now, not after the first category
    names = make_dataset(args.out, categories=args.categories, seed=args.seed,
                         pose=args.pose, overwrite=args.force, progress=args.progress,
                         **{name: getattr(args, name) for name in SYNTH_SIZES})
    print(f"wrote {len(names)} categories to {args.out}: {', '.join(names)}")
    return 0
