"""End-to-end PaDiM predict throughput on a GPU (benchmarks/gpu_check.sh).

resnet18 (random weights: timing only) at 256 px, fitted on 64 random images, then
predict on a 2048-image float32 tensor in host memory at batch 64 and 128 with float32 and
bfloat16 backbones, and predict from a folder of PNGs. Each row: one warm-up pass on 256
images, then the whole set once, timed to the last result on the host (predict returns
CPU tensors). Prints one "predict:" line per row and writes JSON to --json.

Run: python3 benchmarks/gpu_predict.py --json predict.json
"""
import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from stnpadim_ext.models.padim import PaDiM

SIZE = 256


def timed_predict(model: PaDiM, images) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    scores, maps = model.predict(images)
    assert scores.device.type == "cpu" and bool(torch.isfinite(maps).all())
    return time.perf_counter() - start


def write_pngs(folder: Path, n: int, side: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
    for i in range(n):
        img = np.roll(base, i, axis=1)  # distinct files, cheap to make
        Image.fromarray(img).save(folder / f"{i:05d}.png", compress_level=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--pngs", type=int, default=512)
    parser.add_argument("--png-side", type=int, default=512)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.backends.cudnn.benchmark = True
    gen = torch.Generator().manual_seed(0)
    train = torch.rand(64, 3, SIZE, SIZE, generator=gen)
    images = torch.rand(args.images, 3, SIZE, SIZE, generator=gen)
    rows = []
    fitted = {}
    for dtype in ("float32", "bfloat16"):
        for batch in (64, 128):
            model = PaDiM(backbone="resnet18", pretrained=False, image_size=SIZE, device="cuda",
                          backbone_dtype=dtype, batch_size=batch, progress=False)
            if dtype in fitted:  # same weights and Gaussians for every batch size
                model.embedding.load_state_dict(fitted[dtype].embedding.state_dict())
                model.gaussian, model.grid = fitted[dtype].gaussian, fitted[dtype].grid
            else:
                start = time.perf_counter()
                model.fit(train)
                torch.cuda.synchronize()
                rows.append({"what": f"fit 64 imgs {dtype}", "seconds": time.perf_counter() - start})
                fitted[dtype] = model
            timed_predict(model, images[:256])
            seconds = timed_predict(model, images)
            rows.append({"what": f"predict tensor {dtype} batch {batch}", "images": args.images,
                         "seconds": seconds, "images_per_second": args.images / seconds})
            print(f"predict: {rows[-1]['what']}: {rows[-1]['images_per_second']:.0f} img/s", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_pngs(folder, args.pngs, args.png_side, seed=1)
        for dtype in ("float32", "bfloat16"):
            model = fitted[dtype]
            model.batch_size = 64
            timed_predict(model, sorted(folder.iterdir())[:64])
            seconds = timed_predict(model, folder)
            rows.append({"what": f"predict folder {args.pngs} PNG {args.png_side}px {dtype} batch 64",
                         "images": args.pngs, "seconds": seconds, "images_per_second": args.pngs / seconds})
            print(f"predict: {rows[-1]['what']}: {rows[-1]['images_per_second']:.0f} img/s", flush=True)
    print(f"predict: peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
