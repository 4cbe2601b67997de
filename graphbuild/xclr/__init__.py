"""The trainer side: X-CLR soft targets, the loss, a neighbour-aware sampler, dataset adapters.

Thin to import and to install: numpy, pyarrow, torch and google-crc32c, never a text encoder,
zarr or polars. It reads a run through graphbuild.rundir, the format the builder writes, with
the same checks (crc32c of every chunk, the graph's provenance against the store, ids).

  targets.py  SoftTargets: softmax_j(cos(t_i, t_j) / tau_s) over a batch, exact or from the graph
  exact.py    targets_from_rows: exact targets from a batch's stored rows (SoftTargets' core)
  layout.py   a batch's targets around its logits: no-target items, views, diagonal, softmax
  loss.py     xclr_loss, and SimCLR and SupCon as special cases of its targets
  data.py     NeighborBatchSampler, WithNodes (items joined to samples by id), GraphRows
  graph.py    Graph: the top-k graph in memory (CSR), for graph-mode targets and the sampler,
              and the per-row fill of the pairs it does not hold
  stream.py   SidecarJoin: a WebDataset stream's samples joined by key to their sidecar rows
              (`graphbuild export`), and a batch's rows turned into targets; no store needed
              (webdataset itself stays optional: stream.py never imports it)
"""

from graphbuild.rundir.samples import read_sample_nodes
from graphbuild.rundir.store import ZarrRows  # the store's reader, StoredRows
from graphbuild.xclr.data import NO_TARGET, GraphRows, NeighborBatchSampler, SampleJoin, WithNodes
from graphbuild.xclr.exact import targets_from_rows
from graphbuild.xclr.graph import Graph
from graphbuild.xclr.loss import simclr_targets, supcon_targets, xclr_loss
from graphbuild.xclr.stream import SidecarJoin, payload_targets
from graphbuild.xclr.targets import SoftTargets, soft_targets

__all__ = ["NO_TARGET", "Graph", "GraphRows", "NeighborBatchSampler", "SampleJoin",
           "SidecarJoin", "SoftTargets", "WithNodes", "ZarrRows", "payload_targets",
           "read_sample_nodes", "simclr_targets", "soft_targets", "supcon_targets",
           "targets_from_rows", "xclr_loss"]
