"""Soft targets for a WebDataset stream: each sample joined, by key, with its row of the tar's
sidecar (`graphbuild export`), and a batch's payload rows turned into targets. No store, no
random access, no text encoder on the training node.

    join = SidecarJoin("/data/cc3m-xclr", run="3f2a...-9c41...")  # or the run's directory
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(urls), wds.split_by_node, wds.split_by_worker,
        wds.tarfile_to_samples(),
        join,                                    # sample["__xclr__"]: its payload row
        wds.shuffle(5000), wds.decode("pil"), wds.to_tuple("jpg", "__xclr__"),
        wds.map_tuple(preprocess, None), wds.batched(256))
    for images, payload in loader:
        loss = xclr_loss(model(images), join.targets(payload, tau_s=0.1), tau=0.1)

The join. Samples come from `wds.tarfile_to_samples()` with `__key__` and `__url__`. When the
stream enters a tar, the join reads that tar's sidecar (DIR/NAME.parquet for .../NAME.tar:
page checksums, its schema, its run id and payload against DIR/_meta.json, its tar's name)
and keeps the last `cache_tars` of them; each sample then gets `sample["__xclr__"]`, its
row's bytes as a uint8 array (rundir/sidecar.py: node, then payload). Place it before the
shuffle buffer, where a worker's samples still come tar by tar. The field is named like
webdataset's own `__key__` and `__url__`, so its decoders pass it by without a look (a
field without the leading "__" would go through every decoder handler, which costs a
captions-only loader more than the join itself); webdataset's collation stacks the rows
into a (B, row bytes) array, a DataLoader turns that into a tensor, and a list of rows
works too. A key the sidecar lacks is an error: the tar is not the one exported. Keys the
run holds no sample for carry node -1 (no target: a zero row and column).

Workers and ranks. The join holds no state but its cache, so it pickles into each DataLoader
worker, which reads the sidecars of its own tars; under DDP, each rank streams its own shards
(wds.split_by_node) and joins them alike. For negatives from every rank, all-gather the
batch's payload rows (a uint8 tensor, equal B on every rank) and pass them as `columns`,
with `self_at=rank * B`: the rank's rows of the whole batch's targets. webdataset itself is
not imported here: the join is a plain callable over an iterator of samples, so
`import graphbuild.xclr` never needs it.

Targets. `join.targets(batch, tau_s=...)` (or `payload_targets`) unpacks the batch's rows and
runs targets_from_rows (xclr/exact.py), the function SoftTargets(mode="exact") goes through:
  fp16   the stored rows: targets equal SoftTargets(mode="exact") for the same samples, bit
         for bit (same views, diagonal, dtype and device);
  int8   rows dequantised (q * scale, float32), then the same function: not bit-identical;
  pca-N  the projected fp16 rows, renormalised by the same function: not bit-identical.
For int8 and pca-N, KL(exact || streamed) is measured in benchmarks/sidecar_payloads.py.

The run. `run=` names the run the trainer trains against: its directory (run.json, the
store's zarr.json and each chunk's 4-byte crc32c are read, no rows) or its id (`graphbuild
export` prints it). A sidecar directory of another run or provenance is refused at
construction; `payload=` refuses one of another payload (e.g. "fp16" where bit-identity is
required).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from graphbuild.errors import GraphbuildError
from graphbuild.rundir.sidecar import (
    META,
    Payload,
    RunIdentity,
    Sidecar,
    check_identity,
    expected_identity,
    meta_payload,
    read_dir_meta,
    read_sidecar,
    sidecar_name,
    unpack,
)
from graphbuild.xclr.exact import targets_from_rows
from graphbuild.xclr.layout import UNSTATED

log = logging.getLogger(__name__)
FIELD = "__xclr__"
THRASH_CHECK = 4096  # samples after which a join reloading sidecars all the time says so


class SidecarJoin:
    """A webdataset pipeline stage joining each sample to its sidecar row by key (module
    docstring); `targets(batch, ...)` turns a batch of the rows it attached into targets."""

    def __init__(self, sidecars: str | Path, *, run: str | Path | RunIdentity,
                 payload: str | None = None, field: str = FIELD, cache_tars: int = 2):
        self.dir = Path(sidecars)
        meta = read_dir_meta(self.dir)
        self.payload = meta_payload(meta, self.dir / META)
        if payload is not None:
            want = Payload.parse(payload, meta.get("store_dim"))
            if want != self.payload:
                raise GraphbuildError(f"{self.dir / META}: holds payload {self.payload.spec} "
                                      f"(dim {self.payload.dim}), payload={payload!r} was asked "
                                      "for; export the run with that --payload")
        check_identity(meta, expected_identity(run), self.dir / META)
        if not field.startswith("__"):
            raise GraphbuildError(f"field={field!r}: name it with a leading '__', as webdataset "
                                  "names the fields its decoders pass by (__key__, __url__)")
        self.run_id, self.field, self.cache_tars = meta["run_id"], field, max(1, cache_tars)
        self._cache: OrderedDict[str, tuple[dict[str, int], np.ndarray]] = OrderedDict()
        self._loads = self._samples = 0

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_cache": OrderedDict(), "_loads": 0, "_samples": 0}

    def __call__(self, samples: Iterable[dict]) -> Iterator[dict]:
        for sample in samples:
            key, url = sample.get("__key__"), sample.get("__url__")
            if key is None or url is None:
                raise GraphbuildError("SidecarJoin: a sample without __key__ or __url__; place "
                                      "it right after wds.tarfile_to_samples()")
            rows, packed = self._tar(str(url))
            row = rows.get(key)
            if row is None:
                raise GraphbuildError(f"{self.dir / sidecar_name(url)}: no row for key {key!r} "
                                      f"of {url}; the tar is not the one exported: export again")
            sample[self.field] = packed[row]
            self._samples += 1
            yield sample

    def _tar(self, url: str) -> tuple[dict[str, int], np.ndarray]:
        """The tar's key -> row and its packed rows, read when the stream enters the tar."""
        hit = self._cache.get(url)
        if hit is not None:
            self._cache.move_to_end(url)
            return hit
        name = sidecar_name(url)
        side = read_sidecar(self.dir / name, self.payload, self.run_id,
                            tar=name[:-len(".parquet")] + ".tar")
        entry = ({k: i for i, k in enumerate(side.keys)}, side.packed)
        self._cache[url] = entry
        if len(self._cache) > self.cache_tars:
            self._cache.popitem(last=False)
        self._loads += 1
        if self._samples > THRASH_CHECK and self._loads * 64 > self._samples:
            log.warning("SidecarJoin: read %d sidecars for %d samples; is it after the shuffle "
                        "buffer? Place it before, where samples come tar by tar", self._loads,
                        self._samples)
            self._loads = -(1 << 62)  # said once
        return entry

    def sidecar(self, url: str) -> Sidecar:
        """A tar's sidecar, checked as the join reads it (for inspection and tests)."""
        name = sidecar_name(url)
        return read_sidecar(self.dir / name, self.payload, self.run_id,
                            tar=name[:-len(".parquet")] + ".tar")

    def unpack(self, batch) -> tuple[np.ndarray, np.ndarray]:
        """(nodes int64 (-1: no target), rows) of a batch of payload rows (module docstring)."""
        return unpack(packed_batch(batch), self.payload)

    def targets(self, batch, *, tau_s: float, diagonal: str = "mask", views: int = 1,
                dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                columns=None, self_at=UNSTATED) -> torch.Tensor:
        """(views*B, views*B) targets of a batch of this join's payload rows; with `columns`
        (payload rows too, e.g. every rank's batch gathered), (views*B, views*C)."""
        return payload_targets(batch, self.payload, tau_s=tau_s, diagonal=diagonal,
                               views=views, dtype=dtype, device=device, columns=columns,
                               self_at=self_at)


def packed_batch(batch) -> np.ndarray:
    """A batch of payload rows as one (B, row bytes) uint8 array: such an array or tensor
    (webdataset's collation, then a DataLoader's), or a list of rows (arrays or bytes)."""
    if isinstance(batch, torch.Tensor):
        batch = batch.detach().cpu().numpy()
    if not isinstance(batch, np.ndarray):
        rows = [np.frombuffer(r, np.uint8) if isinstance(r, (bytes, bytearray, memoryview))
                else np.asarray(r.detach().cpu() if isinstance(r, torch.Tensor) else r)
                for r in batch]
        if not rows or len({r.shape for r in rows}) != 1:
            raise GraphbuildError("payload batch: a non-empty list of the rows SidecarJoin "
                                  "attached, all of one length (one sidecar directory)")
        batch = np.stack(rows)
    if batch.dtype != np.uint8 or batch.ndim != 2:
        raise GraphbuildError(f"payload batch: (B, row bytes) uint8 rows as SidecarJoin "
                              f"attaches them, got {batch.dtype} {batch.shape}")
    return batch


def payload_targets(batch, payload: Payload, *, tau_s: float, diagonal: str = "mask",
                    views: int = 1, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu", columns=None,
                    self_at=UNSTATED) -> torch.Tensor:
    """Targets of a batch of payload rows of `payload` (module docstring): exact mode's for
    fp16 rows, bit for bit. `columns`: payload rows of the columns (under DDP, every rank's
    batch in rank order, a uint8 tensor all-gather), with `self_at` as SoftTargets takes it:
    the rows of SoftTargets(idx, columns=all_idx, self_at=...)."""
    nodes, rows = unpack(packed_batch(batch), payload)
    if columns is None:
        return targets_from_rows(torch.from_numpy(rows), nodes, tau_s=tau_s,
                                 diagonal=diagonal, views=views, dtype=dtype, device=device,
                                 self_at=self_at)
    col_nodes, col_rows = unpack(packed_batch(columns), payload)
    return targets_from_rows(torch.from_numpy(rows), nodes, tau_s=tau_s, diagonal=diagonal,
                             views=views, dtype=dtype, device=device,
                             column_rows=torch.from_numpy(col_rows), column_nodes=col_nodes,
                             self_at=self_at)
