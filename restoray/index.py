"""`restoray index build` and `restoray index query`: resolve the run, connect to Ray, build or query, print a table."""

from __future__ import annotations

from pathlib import Path

from restoray.config import RunConfig
from restoray.ray_env import connect, on_cluster
from runtime.storage import check_shared_storage


def run_index_build(config: RunConfig, input_uri: str, output_uri: str, embeddings_uri: str | None, index_type: str | None) -> int:
    from restoray.ray_env import cluster_address, loopback_only

    if not cluster_address(config.ray):
        loopback_only()
    from pipelines.build_index import build_index
    from restoration.models.presets import load_preset

    load_preset(config.preset)  # an unknown preset is bad input: fail before Ray starts
    index_config = config.index.model_copy(update={"index_type": index_type}) if index_type else config.index
    paths = {"--input": input_uri, "--output": output_uri, "--embeddings": embeddings_uri}
    check_shared_storage(on_cluster(config.ray), paths, config.storage)
    print(f"Ray: {connect(config.ray)}")
    summary = build_index(input_uri, output_uri, index_config, config.data, config.preset, config.storage, embeddings_uri=embeddings_uri)
    print(summary.table())
    return 0


def load_index(uri: str, config: RunConfig):
    """A ReferenceIndex from a local path or s3:// (downloaded into the cache, ETag-checked)."""
    from restoration.errors import InputError
    from restoration.retrieval.references import ReferenceIndex
    from runtime.resolve import resolve

    if not uri.startswith("s3://") and not Path(uri).exists():
        raise InputError(f"--index {uri}: no such index (build one with `restoray index build`)")
    return ReferenceIndex.load(resolve(uri, config.storage, config.mlflow))


def run_index_query(config: RunConfig, image_path: str, index_uri: str, k: int) -> int:
    from restoray.restore import read_image

    image = read_image(image_path)
    index = load_index(index_uri, config)
    references = index.query([image], k)[0]
    print(f"{'rank':>4}  {'similarity':>10}  {'id':<32}  source")
    for rank, reference in enumerate(references, 1):
        print(f"{rank:>4}  {reference.similarity:>10.4f}  {reference.id:<32}  {reference.source}")
    return 0
