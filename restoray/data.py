"""`restoray data build`: resolve the run, connect to Ray, build, print the summary, write the report."""

from __future__ import annotations

import logging

from restoray.config import RunConfig
from restoray.ray_env import connect
from restoray.uris import s3_endpoint

log = logging.getLogger(__name__)


def run_data_build(config: RunConfig, input_uri: str, output_uri: str, report_path: str | None = None) -> int:
    from restoray.ray_env import cluster_address, loopback_only

    if not cluster_address(config.ray):
        loopback_only()  # before anything imports Ray
    from pipelines.build_dataset import build_dataset
    from pipelines.sources import list_units
    from restoration.models.presets import load_preset

    load_preset(config.preset)  # an unknown preset is bad input: fail before Ray starts
    endpoint = s3_endpoint(config.storage)
    from pipelines.build_dataset import storage_options

    listed = list_units(input_uri, config.data.source, storage_options(endpoint))  # unreadable input: fail before Ray starts
    print(f"Ray: {connect(config.ray)}")
    summary = build_dataset(input_uri, output_uri, config.data, config.preset, endpoint, listed=listed)
    print(summary.table())
    if report_path:
        from pipelines.report import write_report

        write_report(output_uri, report_path, endpoint)
        print(f"report: {report_path}")
    return 0
