"""A tar's stored rows turned into its sidecar payload (rundir/sidecar.py gives the format).

  fp16   the stored fp16 rows as they are: targets bit for bit those of the store
  int8   per row, q = round(x * 127 / max|x|) and scale = max|x| / 127, so x ~ q * scale with
         an error of at most scale / 2 a value
  pca-N  x @ V, V the (dim, N) top principal axes of the store's rows, uncentred (those of
         E[x x^T], which keep inner products best), as fp16. Fitted once per export directory
         on up to FIT_ROWS rows (whole chunks, chosen with a fixed seed), in float64; each
         axis's sign is fixed so that its largest entry is positive, and the basis is saved
         (DIR/_pca.npy, its sha256 in DIR/_meta.json) so every shard and resume projects on
         the same axes.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np

from graphbuild.errors import GraphbuildError
from graphbuild.rundir.files import atomic_path
from graphbuild.rundir.sidecar import Payload
from graphbuild.rundir.store import StoredRows

FIT_ROWS = 1 << 20
FIT_SEED = 0


def encode(payload: Payload, rows: np.ndarray,
           basis: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    """(values (n, payload.dim), int8's scales or None) of fp16 rows (n, store dim)."""
    if payload.kind == "fp16":
        return rows, None
    x = rows.astype(np.float32)
    if payload.kind == "pca":
        return (x @ basis).astype(np.float16), None
    scale = np.abs(x).max(axis=1) / 127
    safe = np.where(scale > 0, scale, 1)
    q = np.clip(np.rint(x / safe[:, None]), -127, 127).astype(np.int8)
    return q, scale.astype(np.float32)


def fit_basis(rows: StoredRows, n: int) -> np.ndarray:
    """The top-n uncentred principal axes of the store's rows, (dim, n) float32."""
    chunks = np.arange(rows.n_chunks)
    want = -(-FIT_ROWS // rows.chunk_rows)
    if len(chunks) > want:
        chunks = np.sort(np.random.default_rng(FIT_SEED).choice(chunks, want, replace=False))
    d = rows.shape[1]
    moment = np.zeros((d, d), np.float64)
    for c in chunks.tolist():
        x = rows.chunk(c).astype(np.float64)
        moment += x.T @ x
    _, vectors = np.linalg.eigh(moment)
    basis = vectors[:, ::-1][:, :n]
    signs = np.sign(basis[np.abs(basis).argmax(axis=0), np.arange(n)])
    return (basis * signs).astype(np.float32)


def save_basis(path: Path, basis: np.ndarray) -> str:
    """Write the basis (npy) atomically; return its sha256."""
    buf = io.BytesIO()
    np.save(buf, basis, allow_pickle=False)
    data = buf.getvalue()
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def load_basis(path: Path, sha256: str, payload: Payload, store_dim: int) -> np.ndarray:
    """The saved basis, checked against its recorded sha256 and shape."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise GraphbuildError(f"{path}: missing, and the directory's sidecars were projected "
                              "on it; export again with --overwrite") from None
    if hashlib.sha256(data).hexdigest() != sha256:
        raise GraphbuildError(f"{path}: its sha256 is not the one _meta.json records; export "
                              "again with --overwrite")
    basis = np.load(io.BytesIO(data), allow_pickle=False)
    if basis.shape != (store_dim, payload.dim):
        raise GraphbuildError(f"{path}: shape {basis.shape}, not ({store_dim}, {payload.dim})")
    return basis
