"""The crop store's on-disk layout, a streaming writer and a random-access reader.

Layout (``results/crops/{slide}.zarr``, a zarr v3 group): arrays ``images`` (N, s, s, 3) uint8,
``masked`` (N, s, s, 3) uint8 and ``masks`` (N, s, s) bool, each **sharded**: one shard file
holds ``SHARD_CROPS`` crops (``c.<k>.0.0[.0]``), and inside it every crop is its own inner chunk
(``bytes`` → ``blosc`` lz4), followed by the shard index (``bytes`` little-endian → ``crc32c``) at
the end of the file — the zarr v3 ``sharding_indexed`` codec, so any zarr v3 reader (zarr-python,
zarrs, napari) reads the store. Why this layout:

* one crop per inner chunk: a random read decodes 19 KB (80×80×3), not a whole chunk of 64 crops
  (1.2 MB) — chunking decides random-access speed (``../shared/notes/machine-facts.md``);
* shards of 1,024 crops: a 500k-crop cohort is ~1,500 files, not 1.5 million;
* lz4: on H&E crops it decodes ~3× and encodes ~4× faster than zstd for ~15 % more bytes.

zarr-python's own sharded write (~1.7k crops/s) and per-item read (~0.7 ms of machinery) are
slower than the pipeline needs, so :class:`CropStoreWriter` encodes inner chunks with numcodecs'
Blosc and appends them to the shard files itself, and :class:`CropStoreReader` keeps each shard's
index in memory and reads one crop with one ``pread`` + decode. Both check the array metadata
first and handle exactly this layout; the tests read every store back through zarr-python.
"""

from __future__ import annotations

import json
import os
import struct
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ..utils import CellstageError

SHARD_CROPS = 1024
ARRAYS = ("images", "masked", "masks")
_EMPTY = np.uint64(2**64 - 1)  # index entry of an absent inner chunk (zarr v3 sharding spec)
_CODEC = {"cname": "lz4", "clevel": 5, "shuffle": "noshuffle", "typesize": 1, "blocksize": 0}
_KEY = {"name": "default", "configuration": {"separator": "."}}


def create_crop_arrays(root, n: int, size: int, *, shard: int = SHARD_CROPS) -> dict:
    """Create the three sharded arrays of a crop store in the zarr group ``root``."""
    from zarr.codecs import BloscCodec

    shard = max(1, min(int(shard), max(int(n), 1)))
    out = {}
    for name in ARRAYS:
        tail = (size, size, 3) if name != "masks" else (size, size)
        out[name] = root.create_array(
            name, shape=(n, *tail), chunks=(1, *tail), shards=(shard, *tail),
            dtype="bool" if name == "masks" else "uint8", compressors=[BloscCodec(**_CODEC)],
            fill_value=False if name == "masks" else 0, chunk_key_encoding=_KEY,
            dimension_names=("n", "y", "x", "c")[: 1 + len(tail)],
        )
    return out


def _layout(array_dir: Path) -> dict | None:
    """Shard shape, item shape, dtype and chunk-key separator of an array in this layout, else None."""
    try:
        md = json.loads((array_dir / "zarr.json").read_text())
        (codec,) = md["codecs"]
        cfg = codec["configuration"]
        inner, index = cfg["codecs"], cfg["index_codecs"]
        shape, shard = md["shape"], md["chunk_grid"]["configuration"]["chunk_shape"]
        ok = (md.get("zarr_format") == 3 and codec["name"] == "sharding_indexed"
              and cfg.get("index_location", "end") == "end"
              and list(cfg["chunk_shape"]) == [1, *shape[1:]] and list(shard[1:]) == list(shape[1:])
              and [c["name"] for c in inner] == ["bytes", "blosc"]
              and [c["name"] for c in index] == ["bytes", "crc32c"]
              and index[0].get("configuration", {}).get("endian", "little") == "little"
              and md["data_type"] in ("uint8", "bool")
              and md["chunk_key_encoding"]["name"] == "default")
        if not ok:
            return None
        return {"n": int(shape[0]), "shard": int(shard[0]), "item_shape": tuple(shape[1:]),
                "dtype": np.dtype(md["data_type"]), "blosc": inner[1]["configuration"],
                "sep": md["chunk_key_encoding"].get("configuration", {}).get("separator", "/"),
                "ndim": len(shape)}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _shard_path(array_dir: Path, lay: dict, k: int) -> Path:
    parts = ["c", str(k)] + ["0"] * (lay["ndim"] - 1)
    return array_dir.joinpath(*lay["sep"].join(parts).split("/"))


class CropStoreWriter:
    """Append crops to the arrays made by :func:`create_crop_arrays`, in row order.

    ``add(images, masked, masks)`` takes (m, ...) batches; each array is encoded and written by
    its own background thread (blosc releases the GIL), so the three arrays and the caller's
    cutting run in parallel. ``close()`` must be called; it raises what a writer thread raised.
    """

    def __init__(self, group_dir, arrays: dict):
        from numcodecs import Blosc

        self.dir = Path(group_dir)
        self.n_written = 0
        self._lay, self._state = {}, {}
        for name, arr in arrays.items():
            lay = _layout(self.dir / name)
            if lay is None:
                raise CellstageError(f"{self.dir / name}: not a crop array of the layout made by create_crop_arrays")
            lay["shape"] = tuple(arr.shape)
            self._lay[name] = lay
            self._state[name] = {"k": -1, "fh": None, "index": None, "pos": 0, "row": 0}
        b = next(iter(self._lay.values()))["blosc"]
        shuffle = {"noshuffle": Blosc.NOSHUFFLE, "shuffle": Blosc.SHUFFLE, "bitshuffle": Blosc.BITSHUFFLE}
        # numcodecs.blosc.compress arguments (the array's own codec settings)
        self._blosc = (b["cname"].encode(), int(b["clevel"]), shuffle[b["shuffle"]], int(b.get("blocksize", 0)))
        self._ex = {name: ThreadPoolExecutor(1, thread_name_prefix=f"crops-{name}") for name in arrays}
        self._futs: dict[str, list] = {name: [] for name in arrays}

    def add(self, **batches: np.ndarray) -> None:
        m = {len(b) for b in batches.values()}
        if set(batches) != set(self._lay) or len(m) != 1:
            raise ValueError(f"add() needs equally long batches for {sorted(self._lay)}, got {sorted(batches)}")
        for name, batch in batches.items():
            futs = self._futs[name]
            while len(futs) > 2:  # bound the memory held by queued batches
                futs.pop(0).result()
            futs.append(self._ex[name].submit(self._write, name, np.ascontiguousarray(batch)))
        self.n_written += m.pop()

    def _write(self, name: str, batch: np.ndarray) -> None:
        from numcodecs import blosc

        lay, st = self._lay[name], self._state[name]
        batch = batch.astype(lay["dtype"], copy=False)
        cname, clevel, shuffle, blocksize = self._blosc
        a = 0
        while a < len(batch):
            k, j = divmod(st["row"], lay["shard"])
            if k != st["k"]:
                self._finish_shard(name)
                path = _shard_path(self.dir / name, lay, k)
                path.parent.mkdir(parents=True, exist_ok=True)
                st.update(k=k, fh=open(path, "wb"), pos=0,
                          index=np.full((lay["shard"], 2), _EMPTY, dtype="<u8"))
            part = batch[a: a + lay["shard"] - j]  # the rest of this shard at most
            enc = [blosc.compress(item, cname, clevel, shuffle, blocksize) for item in part]
            sizes = np.fromiter(map(len, enc), dtype=np.uint64, count=len(enc))
            ends = np.cumsum(sizes) + np.uint64(st["pos"])
            st["index"][j: j + len(enc), 0] = ends - sizes
            st["index"][j: j + len(enc), 1] = sizes
            st["fh"].write(b"".join(enc))
            st["pos"] = int(ends[-1])
            st["row"] += len(enc)
            a += len(enc)

    def _finish_shard(self, name: str) -> None:
        import google_crc32c

        st = self._state[name]
        if st["fh"] is None:
            return
        raw = st["index"].tobytes()
        st["fh"].write(raw + struct.pack("<I", google_crc32c.value(raw)))
        st["fh"].close()
        st["fh"] = None

    def abort(self) -> None:
        """Stop the writer threads after a failure (the caller discards the store)."""
        for name, ex in self._ex.items():
            for f in self._futs[name]:
                f.cancel()
            ex.shutdown(wait=True)
            st = self._state[name]
            if st["fh"] is not None:
                st["fh"].close()
                st["fh"] = None

    def close(self) -> None:
        errors = []
        for name, ex in self._ex.items():
            for f in self._futs[name]:
                try:
                    f.result()
                except BaseException as e:  # noqa: BLE001 - re-raised below
                    errors.append(e)
            try:
                ex.submit(self._finish_shard, name).result()
            except BaseException as e:  # noqa: BLE001
                errors.append(e)
            ex.shutdown(wait=True)
        for name, st in self._state.items():
            if not errors and st["row"] != self._lay[name]["shape"][0]:
                expected = self._lay[name]["shape"][0]
                errors.append(CellstageError(f"{self.dir / name}: wrote {st['row']} of {expected} crops"))
        if errors:
            raise errors[0]


class CropStoreReader:
    """Random access to one array of a crop store: ``reader[i]`` → (s, s, 3) or (s, s).

    In the layout of this module, shard indices are read once and kept, and a crop costs one
    ``pread`` plus an lz4 decode (~20 µs for 80×80×3); any other zarr array (e.g. stores written
    before this layout, or by other tools) is read through zarr-python. Safe to pickle (file
    handles are reopened in worker processes).
    """

    MAX_OPEN = 64

    def __init__(self, zarr_group, name: str):
        self.path = Path(zarr_group)
        self.name = name
        self._lay = _layout(self.path / name)
        self._zarr = None
        self._fds: OrderedDict[int, int] = OrderedDict()
        self._index: dict[int, np.ndarray] = {}
        if self._lay is None:
            import zarr

            try:
                self._zarr = zarr.open_group(str(self.path), mode="r")[name]
            except Exception as e:
                raise CellstageError(f"{self.path}: no crop array {name!r} ({type(e).__name__}: {e})") from e
            self.shape = tuple(self._zarr.shape)
            self.dtype = np.dtype(self._zarr.dtype)
        else:
            self.shape = (self._lay["n"], *self._lay["item_shape"])
            self.dtype = self._lay["dtype"]

    def __len__(self) -> int:
        return self.shape[0]

    def _fd(self, k: int) -> int:
        fd = self._fds.get(k)
        if fd is None:
            p = _shard_path(self.path / self.name, self._lay, k)
            try:
                fd = os.open(p, os.O_RDONLY)
            except FileNotFoundError:
                return -1  # shard never written: every crop in it is the fill value
            self._fds[k] = fd
            if len(self._fds) > self.MAX_OPEN:
                os.close(self._fds.popitem(last=False)[1])
        else:
            self._fds.move_to_end(k)
        return fd

    def _shard_index(self, k: int, fd: int) -> np.ndarray:
        idx = self._index.get(k)
        if idx is None:
            nbytes = self._lay["shard"] * 16
            size = os.fstat(fd).st_size
            raw = os.pread(fd, nbytes, size - nbytes - 4)
            if len(raw) != nbytes:
                raise CellstageError(f"{self.path / self.name}: shard {k} is truncated ({size} bytes)")
            idx = np.frombuffer(raw, dtype="<u8").reshape(-1, 2)
            self._index[k] = idx
        return idx

    def __getitem__(self, i) -> np.ndarray:
        """One crop for an integer; (k, ...) crops for a slice or integer array (axis 0 only)."""
        if isinstance(i, slice):
            return self.take(np.arange(self.shape[0])[i])
        if not isinstance(i, (int, np.integer)):
            return self.take(i)
        i = int(i)
        if not 0 <= i < self.shape[0]:
            raise IndexError(f"{self.path / self.name}: row {i} outside 0..{self.shape[0] - 1}")
        if self._zarr is not None:
            return np.asarray(self._zarr[i])
        from numcodecs import blosc

        k, j = divmod(i, self._lay["shard"])
        fd = self._fd(k)
        out = np.zeros(self.shape[1:], dtype=self.dtype)
        if fd < 0:
            return out
        off, nb = self._shard_index(k, fd)[j]
        if off == _EMPTY:
            return out
        blosc.decompress(os.pread(fd, int(nb), int(off)), out)
        return out

    def take(self, rows) -> np.ndarray:
        """(len(rows), ...) crops in the given order."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) and (rows.min() < 0 or rows.max() >= self.shape[0]):
            raise IndexError(f"{self.path / self.name}: rows outside 0..{self.shape[0] - 1}")
        if self._zarr is not None:
            uniq, inv = np.unique(rows, return_inverse=True)
            return np.asarray(self._zarr.oindex[uniq])[inv] if len(uniq) else np.zeros((0, *self.shape[1:]), self.dtype)
        out = np.empty((len(rows), *self.shape[1:]), dtype=self.dtype)
        for n, i in enumerate(rows.tolist()):
            out[n] = self[i]
        return out

    @property
    def oindex(self):
        """``reader.oindex[rows]`` as for a zarr array (orthogonal selection on axis 0)."""
        return self

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_fds"] = OrderedDict()
        return state
