"""A built reference index, loaded for queries: the faiss index, the vectors it re-ranks from (memory-mapped), the
embeddings table that maps positions to ids and sources, and the reference store holding each source's image at the
restoration model's size. `restoray index build` writes it (docs/architecture.md, "Reference index layout").

    index = ReferenceIndex.load("path/to/index")      # a local directory (upper layers resolve s3://)
    index.query([image], k=3) -> [[Reference(id, source, similarity, image), ...]]

Positions: row i of vectors.npy is the embedding whose id is the i-th smallest; the faiss ids are those positions.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from restoration.dataset import EMBEDDING_SCHEMA, one_row_per_id
from restoration.errors import InputError
from restoration.retrieval.index import Searcher, SearchParameters, read_index

INDEX_FILE = "index.faiss"
VECTORS_FILE = "vectors.npy"
MANIFEST_FILE = "manifest.json"
# The reference store: one row per source, files sorted by id in small row groups (a lookup reads one group).
REFERENCE_SCHEMA = pa.schema(
    [("id", pa.string()), ("source", pa.string()), ("image", pa.binary()), ("width", pa.int32()), ("height", pa.int32())]
)
REFERENCE_ROW_GROUP = 16


@dataclass
class Reference:
    """One retrieved reference: the store's id, the source URI it came from, cosine similarity to the query."""

    id: str
    source: str
    similarity: float
    image: Image.Image


def parquet_files(directory: Path) -> list[Path]:
    return sorted(path for path in directory.glob("*.parquet") if not path.name.startswith("."))


def read_embeddings(directory: Path, columns: list[str] | None = None) -> pa.Table:
    """The embeddings table of a directory of parquet parts (dataset.one_row_per_id)."""
    files = parquet_files(directory)
    if not files:
        return EMBEDDING_SCHEMA.empty_table().select(columns or EMBEDDING_SCHEMA.names)
    return one_row_per_id(pa.concat_tables([pq.read_table(path, columns=columns) for path in files]))


class ReferenceIndex:
    def __init__(self, directory: Path, manifest: dict, searcher: Searcher, ids: list[str], sources: list[str], scorer):
        self.directory = directory
        self.manifest = manifest
        self.searcher = searcher
        self.ids = ids
        self.sources = sources
        self.scorer = scorer
        self._store: dict[str, Path] | None = None

    @classmethod
    def load(cls, path: str | Path, scorer=None) -> ReferenceIndex:
        """Load an index directory; `scorer` (a models.base.ClipScorer) defaults to the preset the index was built
        with. Raises InputError for a missing or incomplete index, or a model whose embedding width differs."""
        directory = Path(path)
        manifest_path = directory / MANIFEST_FILE
        if not manifest_path.is_file():
            raise InputError(f"{path}: not a reference index (no {MANIFEST_FILE}; build one with `restoray index build`)")
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise InputError(f"{manifest_path} is corrupt ({err})") from None
        if not manifest.get("complete"):
            raise InputError(f"{path}: the index build did not finish (rerun `restoray index build` to complete it)")
        for name in (INDEX_FILE, VECTORS_FILE):
            if not (directory / name).is_file():
                raise InputError(f"{path}: {name} is missing")
        if scorer is None:
            from restoration.models.base import load_clip_scorer
            from restoration.models.presets import load_preset

            spec = load_preset(manifest["preset"])
            scorer = load_clip_scorer(spec.clip_scorer, seed=spec.seed)
        if scorer.dim != manifest["dim"]:
            raise InputError(
                f"{path}: the index holds {manifest['dim']}-dim embeddings ({manifest.get('clip')}) but the model embeds "
                f"{scorer.dim} dims; query with the preset it was built with ({manifest['preset']})"
            )
        vectors = np.load(directory / VECTORS_FILE, mmap_mode="r")
        index = read_index(directory / INDEX_FILE, on_disk=bool(manifest["plan"].get("on_disk")))
        table = read_embeddings(directory / "embeddings", ["id", "source"])
        if not (len(vectors) == index.ntotal == table.num_rows == manifest["count"]):
            raise InputError(
                f"{path}: inconsistent index ({index.ntotal} indexed, {len(vectors)} vectors, {table.num_rows} embeddings, "
                f"manifest {manifest['count']}); rebuild it"
            )
        tuned = manifest.get("search", {})
        parameters = SearchParameters(faiss=tuned.get("faiss", ""), rerank=int(tuned.get("rerank", 1)))
        searcher = Searcher(index, vectors, parameters)
        return cls(directory, manifest, searcher, table.column("id").to_pylist(), table.column("source").to_pylist(), scorer)

    def __len__(self) -> int:
        return len(self.ids)

    def embed(self, images: list[Image.Image]) -> np.ndarray:
        return self.scorer.embed_images(images).numpy()

    def search(self, vectors: np.ndarray, k: int) -> list[list[tuple[int, float]]]:
        """[(position, similarity)] per query, best first."""
        similarities, positions = self.searcher.search(np.asarray(vectors, dtype=np.float32), k)
        return [
            [(int(p), float(s)) for p, s in zip(row_positions, row_similarities, strict=True) if p >= 0]
            for row_positions, row_similarities in zip(positions, similarities, strict=True)
        ]

    def query(self, images: list[Image.Image], k: int = 1) -> list[list[Reference]]:
        """The k nearest references of each image, with their stored images."""
        results = []
        for hits in self.search(self.embed(images), k):
            results.append(
                [Reference(self.ids[p], self.sources[p], round(similarity, 6), self.image(self.ids[p])) for p, similarity in hits]
            )
        return results

    def image(self, reference_id: str) -> Image.Image:
        """The stored image of `reference_id` (the source at the restoration model's size)."""
        if self._store is None:
            self._store = {}
            for path in parquet_files(self.directory / "references"):
                for value in pq.read_table(path, columns=["id"]).column("id").to_pylist():
                    self._store[value] = path
        path = self._store.get(reference_id)
        if path is None:
            raise InputError(f"{self.directory}: reference {reference_id} is not in the reference store")
        table = pq.read_table(path, columns=["image"], filters=[("id", "=", reference_id)])
        return Image.open(io.BytesIO(table.column("image")[0].as_py())).convert("RGB")
