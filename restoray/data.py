"""`restoray data build`: resolve the run, connect to Ray, build, print the summary, write the report."""

from __future__ import annotations

import logging

from restoray.config import RunConfig
from restoray.ray_env import connect, on_cluster
from runtime.storage import check_shared_storage

log = logging.getLogger(__name__)


def run_data_build(
    config: RunConfig, input_uri: str, output_uri: str, report_path: str | None = None, retry_rejected: tuple[str, ...] = ()
) -> int:
    from restoray.ray_env import cluster_address, loopback_only

    if not cluster_address(config.ray):
        loopback_only()  # before anything imports Ray
    from pipelines.build_dataset import build_dataset
    from pipelines.listing import check_input
    from restoration.models.presets import load_preset

    load_preset(config.preset)  # an unknown preset is bad input: fail before Ray starts
    check_shared_storage(on_cluster(config.ray), {"--input": input_uri, "--output": output_uri}, config.storage)
    check_input(input_uri, config.storage)  # a missing or unreachable input: fail before Ray starts
    print(f"Ray: {connect(config.ray)}")
    summary = build_dataset(input_uri, output_uri, config.data, config.preset, config.storage, retry_rejected=retry_rejected)
    print(summary.table())
    if report_path:
        from pipelines.report import write_report

        write_report(output_uri, report_path, config.storage)
        print(f"report: {report_path}")
    return 0
