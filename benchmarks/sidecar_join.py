"""What SidecarJoin costs a webdataset loader: samples/s with and without the join stage.

Two loaders over real data, each timed with and without the join (fp16 and int8 sidecars),
alternating, --repeats passes over every tar, in one process (num_workers=0). Rates are
samples per second of the process's CPU time (time.process_time, pyarrow's threads
included), so other jobs on the shared machine move them less than wall time; wall-time
rates are printed beside them. The cost is 1 - rate with join / rate without, from the
best and from the median pass.

  captions  the 91,307-caption WebDataset of benchmarks/sidecar_payloads.py (10 tars of
            KEY.txt and KEY.json): tar reading, grouping, a 1,000-sample shuffle buffer,
            decoding text and JSON, batches of 256. No image work at all: the join's cost
            relative to the least a loader does.
  jpeg      10,000 samples of the same keys with a 256x256 JPEG each (random crops of
            scikit-learn's two sample photographs, quality 90), 2,000 to a tar: the same
            stages plus decoding each JPEG and a 224x224 crop to a float tensor, the least
            an image trainer's loader does.

The join reads each tar's sidecar when the stream enters it and attaches each sample's row
as bytes; the rest of the pipeline is the same. On a shared machine the difference of two
loader rates moves by more than the join costs, so the join is also timed alone: its CPU
time per sample over samples already read into memory (best of 5 passes over the set's
first ALONE_TARS tars, each tar's sidecar read included), against the loader's CPU time
per sample without it (its median pass). Prints the tables; asserts nothing.

    python benchmarks/sidecar_join.py [--workdir /tmp/graphbuild-sidecars] [--repeats 5]
    python benchmarks/sidecar_join.py --alone     # the join timed alone, loaders once each
"""

from __future__ import annotations

import argparse
import io
import random
import time
from pathlib import Path

import numpy as np
import torch

JPEGS = 10_000
JPEG_PER_TAR = 2_000
ALONE_TARS = 2


def jpeg_shards(workdir: Path, run: Path) -> tuple[Path, dict[str, Path]]:
    """(shards, sidecars by payload) of the JPEG set, keyed by the run's first keys (idempotent)."""
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
    outs = {}
    for payload in ("fp16", "int8"):
        outs[payload] = workdir / f"jpeg-sidecars-{payload}"
        graphbuild.export(run, shards, outs[payload], payload=payload)
    return shards, outs


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


def samples_per_s(pipeline) -> tuple[float, float, int]:
    """(samples per CPU second, per wall second, samples) of one pass."""
    t0, c0 = time.perf_counter(), time.process_time()
    n = sum(len(batch[0]) for batch in pipeline)
    return n / (time.process_time() - c0), n / (time.perf_counter() - t0), n


def join_alone(urls: list[str], join) -> float:
    """The join's CPU seconds per sample over the first ALONE_TARS tars' samples, read into
    memory first (best of 5 passes, every sidecar read again in each)."""
    import webdataset as wds

    samples = list(wds.tarfile_to_samples()(iter([{"url": u} for u in urls[:ALONE_TARS]])))
    best = float("inf")
    for _ in range(5):
        join._cache.clear()
        c0 = time.process_time()
        for _sample in join(iter(samples)):
            pass
        best = min(best, time.process_time() - c0)
    return best / len(samples)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/graphbuild-sidecars"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--alone", action="store_true",
                    help="only the join timed alone against one pass of each loader")
    args = ap.parse_args()
    from graphbuild.xclr.stream import SidecarJoin

    torch.set_num_threads(1)
    run, captions = args.workdir / "run", args.workdir / "shards"
    if not (args.workdir / "sidecars-int8" / "_meta.json").exists():
        raise SystemExit("run benchmarks/sidecar_payloads.py with this --workdir first")
    jpeg, jpeg_sides = jpeg_shards(args.workdir, run)
    sets = {
        "captions": ([str(p) for p in sorted(captions.glob("*.tar"))], ("txt", "json"), "rgb",
                     False, {"fp16": args.workdir / "sidecars-fp16",
                             "int8": args.workdir / "sidecars-int8"}),
        "jpeg": ([str(p) for p in sorted(jpeg.glob("*.tar"))], ("jpg", "json"), "pil", True,
                 jpeg_sides),
    }
    if args.alone:
        print("the join alone, CPU us per sample (its sidecar reads included), against the "
              "loader's without it (median of 3 passes); 2 CPU cores shared with other jobs")
        for name, (urls, fields, decode, image, sidecars) in sets.items():
            per = 1 / float(np.median([samples_per_s(loader(urls, None, fields, decode,
                                                              image))[0] for _ in range(3)]))
            for payload, d in sidecars.items():
                alone = join_alone(urls, SidecarJoin(d, run=run))
                print(f"{name:>9s} {payload:>5s}: join {alone * 1e6:6.2f} us, loader "
                      f"{per * 1e6:8.2f} us a sample: {100 * alone / per:5.2f}% of the loader",
                      flush=True)
        return
    print(f"webdataset loader samples/s, one process (num_workers=0, torch 1 thread), "
          f"{args.repeats} passes each, alternating; 2 CPU cores shared with other jobs")
    print(f"{'loader':>9s} {'join':>5s} {'samples':>8s} | {'CPU: best':>10s} {'median':>8s} "
          f"{'cost best':>9s} {'median':>7s} | {'wall: best':>10s} {'median':>8s}")
    for name, (urls, fields, decode, image, sidecars) in sets.items():
        variants = {"none": None, **{k: SidecarJoin(d, run=run) for k, d in sidecars.items()}}
        cpu: dict[str, list[float]] = {v: [] for v in variants}
        wall: dict[str, list[float]] = {v: [] for v in variants}
        counts = {}
        for _ in range(args.repeats):
            for v, join in variants.items():
                c, w, counts[v] = samples_per_s(loader(urls, join, fields, decode, image))
                cpu[v].append(c)
                wall[v].append(w)
        base = max(cpu["none"]), float(np.median(cpu["none"]))
        for v in variants:
            best, med = max(cpu[v]), float(np.median(cpu[v]))
            cost = (f"{100 * (1 - best / base[0]):8.1f}% {100 * (1 - med / base[1]):6.1f}%"
                    if v != "none" else f"{'':>8s}  {'':>6s} ")
            print(f"{name:>9s} {v:>5s} {counts[v]:8d} | {best:10,.0f} {med:8,.0f} {cost} | "
                  f"{max(wall[v]):10,.0f} {float(np.median(wall[v])):8,.0f}", flush=True)


if __name__ == "__main__":
    main()
