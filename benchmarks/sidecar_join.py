"""What SidecarJoin costs a webdataset loader: samples/s with and without the join stage.

Two loaders over real data, each timed with and without the join (fp16 and int8 sidecars),
alternating, best of --repeats passes over every tar, in one process (num_workers=0, so the
figures are one core's work and not the scheduling of a shared machine):

  captions  the 91,306-caption WebDataset of benchmarks/sidecar_payloads.py (10 tars of
            KEY.txt and KEY.json): tar reading, grouping, a 1,000-sample shuffle buffer,
            decoding text and JSON, batches of 256. No image work at all: the join's cost
            relative to the least a loader does.
  jpeg      20,000 samples of the same keys with a 256x256 JPEG each (random crops of
            scikit-learn's two sample photographs, quality 90), 2,000 to a tar: the same
            stages plus decoding each JPEG and a 224x224 crop to a float tensor, the least
            an image trainer's loader does.

The join reads each tar's sidecar when the stream enters it and attaches each sample's row
as bytes; the rest of the pipeline is the same. Prints the table; asserts nothing.

    python benchmarks/sidecar_join.py [--workdir /tmp/graphbuild-sidecars] [--repeats 5]
"""

from __future__ import annotations

import argparse
import io
import random
import time
from pathlib import Path

import numpy as np
import torch

JPEGS = 20_000
JPEG_PER_TAR = 2_000


def jpeg_shards(workdir: Path, run: Path) -> tuple[Path, Path]:
    """(shards, fp16 sidecars) of the JPEG set, keyed by the run's first keys (idempotent)."""
    import webdataset as wds
    from PIL import Image
    from sklearn.datasets import load_sample_images

    import graphbuild

    shards = workdir / "jpeg-shards"
    if not shards.exists():
        photos = load_sample_images().images
        rng = np.random.default_rng(0)
        shards.mkdir(parents=True)
        with wds.ShardWriter(str(shards / "%05d.tar"), maxcount=JPEG_PER_TAR, verbose=0) as sink:
            for i in range(JPEGS):
                photo = photos[i % len(photos)]
                y, x = rng.integers(0, photo.shape[0] - 256), rng.integers(0, photo.shape[1] - 256)
                buf = io.BytesIO()
                Image.fromarray(photo[y:y + 256, x:x + 256]).save(buf, format="JPEG", quality=90)
                sink.write({"__key__": f"{i:09d}", "jpg": buf.getvalue(),
                            "json": {"crop": [int(y), int(x)]}})
    out = workdir / "jpeg-sidecars-fp16"
    graphbuild.export(run, shards, out, payload="fp16")
    return shards, out


def crop224(image) -> torch.Tensor:
    a = np.asarray(image, dtype=np.float32)[16:240, 16:240] / 255.0
    return torch.from_numpy(a).permute(2, 0, 1)


def loader(urls: list[str], join, fields: tuple[str, ...], decode: str, image: bool):
    import webdataset as wds

    stages = [wds.SimpleShardList(urls), wds.tarfile_to_samples()]
    if join is not None:
        stages.append(join)
        fields = (*fields, join.field)
    stages += [wds.shuffle(1000, rng=random.Random(0)), wds.decode(decode),
               wds.to_tuple(*fields)]
    if image:
        stages.append(wds.map_tuple(crop224, *([None] * (len(fields) - 1))))
    stages.append(wds.batched(256))
    return wds.DataPipeline(*stages)


def samples_per_s(pipeline) -> tuple[float, int]:
    t0 = time.perf_counter()
    n = sum(len(batch[0]) for batch in pipeline)
    return n / (time.perf_counter() - t0), n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/graphbuild-sidecars"))
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    from graphbuild.xclr.stream import SidecarJoin

    torch.set_num_threads(1)
    run, captions = args.workdir / "run", args.workdir / "shards"
    if not (args.workdir / "sidecars-int8" / "_meta.json").exists():
        raise SystemExit("run benchmarks/sidecar_payloads.py with this --workdir first")
    jpeg, jpeg_side = jpeg_shards(args.workdir, run)
    sets = {
        "captions": ([str(p) for p in sorted(captions.glob("*.tar"))], ("txt", "json"), "rgb",
                     False, {"fp16": args.workdir / "sidecars-fp16",
                             "int8": args.workdir / "sidecars-int8"}),
        "jpeg": ([str(p) for p in sorted(jpeg.glob("*.tar"))], ("jpg", "json"), "pil", True,
                 {"fp16": jpeg_side}),
    }
    print(f"webdataset loader samples/s, one process (num_workers=0, torch 1 thread), best of "
          f"{args.repeats} passes, alternating; 2 CPU cores shared with other jobs")
    print(f"{'loader':>9s} {'join':>5s} {'samples':>8s} {'samples/s':>10s} {'median':>10s} "
          f"{'cost (best)':>11s} {'cost (median)':>13s}")
    for name, (urls, fields, decode, image, sidecars) in sets.items():
        variants = {"none": None, **{k: SidecarJoin(d, run=run) for k, d in sidecars.items()}}
        rates: dict[str, list[float]] = {v: [] for v in variants}
        counts = {}
        for _ in range(args.repeats):
            for v, join in variants.items():
                rate, counts[v] = samples_per_s(loader(urls, join, fields, decode, image))
                rates[v].append(rate)
        base_best, base_med = max(rates["none"]), float(np.median(rates["none"]))
        for v, r in rates.items():
            best, med = max(r), float(np.median(r))
            cost = "" if v == "none" else (f"{100 * (1 - best / base_best):10.1f}% "
                                           f"{100 * (1 - med / base_med):12.1f}%")
            print(f"{name:>9s} {v:>5s} {counts[v]:8d} {best:10,.0f} {med:10,.0f} {cost}",
                  flush=True)


if __name__ == "__main__":
    main()
