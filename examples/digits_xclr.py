"""SimCLR vs SupCon vs X-CLR on scikit-learn's 8x8 digits, on CPU in a few minutes.

The X-CLR targets come from graphbuild: a labelled manifest over the 1,797 images with the
class names "zero".."nine" in the template "a photo of the digit {}.", embedded and knn'd
once by the library (`build_run`, the only step that loads a text encoder). Training then
reads the targets from the run directory with graphbuild.xclr: no text encoder.

All three objectives are xclr_loss with different target graphs (augmentation, class, text)
and share the CNN, augmentations, optimiser, step budget and seeds. Each encoder is scored by
kNN accuracy (k=5, cosine) of held-out images against the training images.

--ddp N trains each encoder on N CPU processes (torch.distributed, gloo) the way a multi-GPU
trainer does: DistributedDataParallel, each rank holding its share of every batch of 128
(N x 128 // N images), all-gathering the embeddings (with gradients) and the sample ids
(labels for SupCon), and taking its own rows of the targets against the gathered batch,
so every row's negatives are the whole batch's.

    pip install scikit-learn
    python examples/digits_xclr.py                       # 3 objectives x 3 seeds, ~3-5 min
    python examples/digits_xclr.py --run runs/digits --epochs 5 --seeds 0  # quicker
    python examples/digits_xclr.py --ddp 2               # the same on 2 processes
    python examples/digits_xclr.py --loader webdataset   # X-CLR streamed from tar shards

With `--loader webdataset` (pip install webdataset), the training images are written as a
WebDataset (KEY.png, KEY.txt: the class name, KEY.json), a run is built over those captions
keyed by the same keys, `graphbuild export` writes a sidecar per tar, and X-CLR trains from
the shards through graphbuild.xclr.stream: targets from each sample's streamed payload row,
no store in the training process.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

from graphbuild.xclr import SoftTargets, WithNodes, simclr_targets, supcon_targets, xclr_loss

CLASSES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
TEMPLATE = "a photo of the digit {}."
OBJECTIVES = ("simclr", "supcon", "xclr")


def load_digits_split(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, np.ndarray,
                                                np.ndarray]:
    """Images (N, 1, 8, 8) in [0, 1], labels, and a fixed stratified 70/30 train/test split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(digits.target, dtype=torch.int64)
    train, test = train_test_split(np.arange(len(y)), test_size=0.3, random_state=seed,
                                   stratify=digits.target)
    return x, y, train, test


def build_run(out: Path, labels: torch.Tensor) -> Path:
    """Embed the class names for every image (sample id: the image's index) and build the
    graph."""
    from graphbuild.embedding.stage import EmbedConfig, embed_shard
    from graphbuild.graph.stage import knn_shard
    from graphbuild.prepare.manifest import load_manifest

    if (out / "graph" / "_meta.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    tsv = out.parent / f"{out.name}-labels.tsv"
    tsv.write_text("image\tlabel\n" + "".join(f"{i}\t{CLASSES[int(c)]}\n"
                                              for i, c in enumerate(labels)))
    manifest = out.parent / f"{out.name}.yaml"
    manifest.write_text(f"name: digits\nsource: {{path: {tsv}, format: tsv}}\n"
                        f"id_column: image\nlabel_column: label\nclasses: {CLASSES}\n"
                        f"templates: [{TEMPLATE!r}]\n")
    embed_shard(load_manifest(manifest), out, 0, 1, EmbedConfig(precision="fp32"))
    knn_shard(out, k=len(CLASSES) - 1, method="exact")
    return out


class Encoder(nn.Module):
    """A small CNN (8x8 -> 128-d features) and a projection head for the loss."""

    def __init__(self, dim: int = 128, proj: int = 64):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
            nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64 * 16, dim), nn.ReLU())
        self.head = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, proj))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random shifts of up to 1 pixel (zero-filled) and Gaussian noise."""
    padded = F.pad(x, (1, 1, 1, 1))
    dx, dy = torch.randint(0, 3, (2, len(x)), generator=gen)
    out = torch.stack([padded[i, :, dy[i]:dy[i] + 8, dx[i]:dx[i] + 8] for i in range(len(x))])
    return (out + 0.1 * torch.randn(out.shape, generator=gen)).clamp(0, 1)


def knn_accuracy(model: Encoder, x: torch.Tensor, y: torch.Tensor, train: np.ndarray,
                 test: np.ndarray, k: int = 5) -> float:
    model.eval()
    with torch.no_grad():
        f = F.normalize(model.features(x), dim=1)
    sims = f[test] @ f[train].T
    votes = y[train][sims.topk(k, dim=1).indices]
    pred = torch.mode(votes, dim=1).values
    return float((pred == y[test]).float().mean())


def train(objective: str, x: torch.Tensor, y: torch.Tensor, train_idx: np.ndarray,
          targets: SoftTargets | None, seed: int, epochs: int, batch_size: int = 128,
          tau: float = 0.2) -> Encoder:
    """One encoder. Under torch.distributed (--ddp) each rank trains on its share of every
    batch against the batch gathered from all ranks; otherwise on the whole batch."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if world > 1 else 0
    share = batch_size // world  # this rank's images of each batch
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed * 1000 + rank)  # its own augmentations
    encoder = Encoder()
    model = nn.parallel.DistributedDataParallel(encoder) if world > 1 else encoder
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    images = TensorDataset(x, y)
    if targets is not None:  # items: (image, label, sample), joined by the run's image ids
        # build_run's TSV holds each image's index as its id; a TSV's ids are text
        images = WithNodes(images, run=targets.run, ids=[str(i) for i in range(len(y))])
    # every rank draws the same batches (one seed) and keeps its share of each
    loader = DataLoader(Subset(images, train_idx), batch_size=share * world, shuffle=True,
                        drop_last=True, generator=torch.Generator().manual_seed(seed))
    mine = slice(rank * share, (rank + 1) * share)
    for _ in range(epochs):
        model.train()
        for img, label, *sample in loader:
            img, label, sample = img[mine], label[mine], [s[mine] for s in sample]
            z = model(torch.cat([augment(img, gen), augment(img, gen)]))
            if world == 1:
                if objective == "simclr":
                    t = simclr_targets(len(img))
                elif objective == "supcon":
                    t = supcon_targets(label, views=2)
                else:
                    t = targets(sample[0], views=2)
                loss = xclr_loss(z, t, tau=tau)
            else:
                # this rank's rows sit at rank * share among the gathered columns
                at = rank * share
                if objective == "simclr":
                    t = simclr_targets(share, columns=share * world, self_at=at)
                elif objective == "supcon":
                    t = supcon_targets(label, views=2, columns=gather_ids(label), self_at=at)
                else:
                    t = targets(sample[0], views=2, columns=gather_ids(sample[0]), self_at=at)
                loss = xclr_loss(z, t, tau=tau, keys=gather_views(z, 2), self_at=at, views=2)
            opt.zero_grad()
            loss.backward()  # DDP averages the ranks' gradients: the whole batch's gradient
            opt.step()
    return encoder


def gather_ids(local: torch.Tensor) -> torch.Tensor:
    """Every rank's ids (sample indices or labels), in rank order: a tensor all-gather."""
    out = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(out, local)
    return torch.cat(out)


def gather_views(z: torch.Tensor, views: int) -> torch.Tensor:
    """Every rank's embeddings, view by view over the whole batch ([view 1 of rank 0, rank 1,
    ...; view 2 of ...]), with gradients flowing back to the rank that owns each row."""
    from torch.distributed.nn.functional import all_gather

    with warnings.catch_warnings():  # torch 2.13 names a successor; this one runs on 2.4+
        warnings.simplefilter("ignore", FutureWarning)
        return torch.cat([torch.cat(all_gather(part)) for part in z.chunk(views)])


def run_all(args: argparse.Namespace, x: torch.Tensor, y: torch.Tensor,
            train_idx: np.ndarray, test_idx: np.ndarray,
            targets: SoftTargets | None) -> dict[str, list[float]]:
    """Every objective and seed; prints a line per encoder (rank 0 only under --ddp)."""
    results: dict[str, list[float]] = {}
    show = not dist.is_initialized() or dist.get_rank() == 0
    for objective in args.objectives:
        for seed in args.seeds:
            t0 = time.perf_counter()
            model = train(objective, x, y, train_idx, targets, seed, args.epochs)
            acc = knn_accuracy(model, x, y, train_idx, test_idx)
            results.setdefault(objective, []).append(acc)
            if show:
                print(f"  {objective:7s} seed {seed}: kNN acc {acc:.4f} "
                      f"({time.perf_counter() - t0:.1f}s)", flush=True)
    return results


def ddp_rank(rank: int, world: int, args: argparse.Namespace, rendezvous: str) -> None:
    """One process of --ddp: joins the group, trains every encoder, rank 0 saves the results."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank,
                            world_size=world)
    x, y, train_idx, test_idx = load_data(args)
    targets = SoftTargets.from_run(args.run, tau_s=args.tau_s) \
        if "xclr" in args.objectives else None
    results = run_all(args, x, y, train_idx, test_idx, targets)
    if rank == 0:
        Path(rendezvous + ".json").write_text(json.dumps(results))
    dist.barrier()  # leave together: a rank gone first closes gloo's connections under the rest
    dist.destroy_process_group()


def load_data(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor, np.ndarray,
                                                  np.ndarray]:
    x, y, train_idx, test_idx = load_digits_split()
    if args.limit:
        train_idx = train_idx[:args.limit]
    return x, y, train_idx, test_idx


def write_digit_shards(root: Path, x: torch.Tensor, y: torch.Tensor, index: np.ndarray,
                       per_shard: int = 200) -> tuple[Path, Path]:
    """Images `index` as WebDataset shards written by webdataset's ShardWriter (KEY.png: the
    8x8 image's raw 0-16 values as 8-bit grey, KEY.txt: its class name, KEY.json: its label;
    KEY: the image's index, 5 digits) and a TSV of (key, caption) for the run. Returns
    (shards directory, TSV)."""
    import io

    import webdataset as wds
    from PIL import Image

    shards, tsv = root / "shards", root / "captions.tsv"
    if tsv.exists():
        return shards, tsv
    shards.mkdir(parents=True, exist_ok=True)
    lines = ["key\tcaption"]
    with wds.ShardWriter(str(shards / "digits-%04d.tar"), maxcount=per_shard,
                         verbose=0) as sink:
        for i in index.tolist():
            png = io.BytesIO()
            raw = (x[i, 0] * 16).round().to(torch.uint8).numpy()
            Image.fromarray(raw, mode="L").save(png, format="PNG")
            key, name = f"{i:05d}", CLASSES[int(y[i])]
            sink.write({"__key__": key, "png": png.getvalue(), "txt": name,
                        "json": {"label": int(y[i])}})
            lines.append(f"{key}\t{name}")
    tsv.write_text("\n".join(lines) + "\n")
    return shards, tsv


def export_digit_shards(root: Path, x: torch.Tensor, y: torch.Tensor, index: np.ndarray,
                        payload: str = "fp16",
                        per_shard: int = 200) -> tuple[Path, Path, Path]:
    """The shards, a run over their captions (id_column: the key) and its export: returns
    (shards, run, sidecars). Each step is skipped or resumed when done already."""
    import graphbuild

    shards, tsv = write_digit_shards(root, x, y, index, per_shard)
    manifest = root / "digits-captions.yaml"
    manifest.write_text(f"name: digits-captions\nsource: {{path: {tsv}, format: tsv}}\n"
                        f"id_column: key\ntext_column: caption\ntemplates: [{TEMPLATE!r}]\n")
    run, sidecars = root / "run", root / f"sidecars-{payload}"
    graphbuild.embed(manifest, run, precision="fp32")
    graphbuild.export(run, shards, sidecars, payload=payload)
    return shards, run, sidecars


def _image(raw: np.ndarray) -> torch.Tensor:
    """A decoded 8-bit PNG of raw 0-16 values as load_digits_split's (1, 8, 8) image."""
    return torch.from_numpy(raw).float().div_(16.0).unsqueeze(0)


def _label(meta: dict) -> int:
    return meta["label"]


def stream_batches(shards: Path, sidecars: Path, run: Path, batch_size: int, seed: int,
                   workers: int = 2, buffer: int = 500):
    """A DataLoader over the shards: (images (B, 1, 8, 8), labels, payload rows, keys) per
    batch, each sample joined to its sidecar row before the shuffle buffer."""
    import random

    import webdataset as wds

    from graphbuild.xclr.stream import SidecarJoin

    join = SidecarJoin(sidecars, run=run)
    urls = sorted(str(p) for p in shards.glob("*.tar"))
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(urls), wds.split_by_worker, wds.tarfile_to_samples(), join,
        wds.shuffle(buffer, rng=random.Random(seed)), wds.decode("l8"),
        wds.to_tuple("png", "json", join.field, "__key__"),
        wds.map_tuple(_image, _label, None, None),
        wds.batched(batch_size, partial=False))
    loader = wds.WebLoader(pipeline, batch_size=None, num_workers=workers)
    return join, loader


def train_streamed(shards: Path, sidecars: Path, run: Path, seed: int, epochs: int,
                   tau_s: float, batch_size: int = 128, tau: float = 0.2) -> Encoder:
    """X-CLR as train() runs it, from the shards: targets from each batch's streamed rows."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = Encoder()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    join, loader = stream_batches(shards, sidecars, run, batch_size, seed)
    for _ in range(epochs):
        model.train()
        for img, _label, payload, _keys in loader:
            z = model(torch.cat([augment(img, gen), augment(img, gen)]))
            loss = xclr_loss(z, join.targets(payload, tau_s=tau_s, views=2), tau=tau)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model


def main(argv: list[str] | None = None) -> dict[str, list[float]]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=Path("runs/digits-xclr"),
                    help="run directory of the class-name targets (built if absent)")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--objectives", nargs="+", default=list(OBJECTIVES), choices=OBJECTIVES)
    ap.add_argument("--tau-s", type=float, default=0.05, help="temperature of the targets")
    ap.add_argument("--limit", type=int, default=None, help="train on this many images only")
    ap.add_argument("--ddp", type=int, default=1, metavar="N",
                    help="train on N CPU processes with gathered negatives (gloo)")
    ap.add_argument("--loader", choices=("tensor", "webdataset"), default="tensor",
                    help="webdataset: X-CLR only, streamed from tar shards with sidecars")
    args = ap.parse_args(argv)
    if args.loader == "webdataset":
        if args.ddp > 1:
            ap.error("--loader webdataset trains on one process; drop --ddp")
        return main_streamed(args)
    if not 1 <= args.ddp <= 128:
        ap.error(f"--ddp takes 1 to 128 processes (a batch of 128 split among them), "
                 f"got {args.ddp}")

    torch.set_num_threads(1)  # a tiny CNN: thread sync costs more than it saves
    x, y, train_idx, test_idx = load_data(args)
    if "xclr" in args.objectives and not (args.run / "graph" / "_meta.json").exists():
        build_run(args.run, y)
    batch = f"batch {128 // args.ddp * args.ddp} ({args.ddp} processes)" if args.ddp > 1 \
        else "batch 128"
    print(f"digits: {len(train_idx)} train / {len(test_idx)} held-out images, "
          f"{args.epochs} epochs, {batch}, seeds {args.seeds}", flush=True)
    if args.ddp > 1:
        import torch.multiprocessing as mp

        with tempfile.TemporaryDirectory() as tmp:
            rendezvous = str(Path(tmp) / "rendezvous")
            mp.spawn(ddp_rank, args=(args.ddp, args, rendezvous), nprocs=args.ddp, join=True)
            results = json.loads(Path(rendezvous + ".json").read_text())
    else:
        targets = SoftTargets.from_run(args.run, tau_s=args.tau_s) \
            if "xclr" in args.objectives else None
        results = run_all(args, x, y, train_idx, test_idx, targets)
    print("kNN accuracy (k=5) on the held-out split, mean ± std over seeds:")
    for objective, accs in results.items():
        print(f"  {objective:7s} {np.mean(accs):.4f} ± {np.std(accs):.4f}  "
              f"({', '.join(f'{a:.4f}' for a in accs)})")
    return results


def main_streamed(args: argparse.Namespace) -> dict[str, list[float]]:
    """--loader webdataset: X-CLR trained from tar shards and their sidecars (built under
    RUN-wds/ if absent), scored as main() scores it."""
    torch.set_num_threads(1)
    x, y, train_idx, test_idx = load_data(args)
    root = args.run.parent / f"{args.run.name}-wds"
    shards, run, sidecars = export_digit_shards(root, x, y, train_idx)
    print(f"digits from {len(list(shards.glob('*.tar')))} tar shards in {shards}: "
          f"{len(train_idx)} train / {len(test_idx)} held-out images, {args.epochs} epochs")
    accs = []
    for seed in args.seeds:
        model = train_streamed(shards, sidecars, run, seed, args.epochs, args.tau_s)
        accs.append(knn_accuracy(model, x, y, train_idx, test_idx))
        print(f"  xclr    seed {seed}: kNN acc {accs[-1]:.4f} (streamed)", flush=True)
    print(f"kNN accuracy (k=5), streamed X-CLR: {np.mean(accs):.4f} ± {np.std(accs):.4f}")
    return {"xclr": accs}


if __name__ == "__main__":
    main()
