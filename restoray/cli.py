"""The `restoray` command line. Every subcommand is a `main(argv)`-style function that returns an exit code.

Exit codes (DESIGN.md): 0 done, 1 failed while working, 2 bad input (arguments, config, files), named in the
message on stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

from restoration.dataset import REASONS
from restoration.errors import InputError, RestorayError
from restoration.evaluation.conventions import CONVENTIONS
from restoray import OUR_PACKAGES, __version__
from restoray.config import describe_keys, load_config

log = logging.getLogger("restoray")

EPILOG = """\
examples:
  restoray demo                                   the embedded default end to end
  restoray list presets                           networks each preset names
  restoray list config                            every config key, its type and meaning
  restoray serve --index data/demo/index          the HTTP API and web UI on the embedded default
  restoray submit --address http://head:8265 -- demo --set seed=1

configs are TOML files (without --config: the packaged default, `restoray list config`); override any key with --set section.key=value.
"""


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", metavar="PATH", default=None, help="TOML run config (default: the embedded local run, restoray/defaults/local.toml)"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        help="override one config key, e.g. --set ray.num_cpus=2 (repeatable; see `restoray list config`)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="restoray",
        description="Build, train, index and serve diffusion-based image restoration (SUPIR, SPIRE, ABAIR, ReFIR) on Ray.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"restoray {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo = commands.add_parser(
        "demo",
        help="run every stage end to end on the embedded default",
        description="Run every stage end to end on the embedded default (local Ray, bundled sample photos, tiny "
        "models, local MLflow): materialise the sample corpus, list the presets, build the run's preset networks.",
    )
    _add_config_arguments(demo)
    demo.set_defaults(handler=_run_demo)

    data = commands.add_parser("data", help="dataset jobs (build)", description="Dataset jobs on Ray Data.")
    data_commands = data.add_subparsers(dest="data_command", metavar="JOB", required=True)
    build = data_commands.add_parser(
        "build",
        help="corpus -> validated, deduplicated, captioned, degraded training shards",
        description="Stream a corpus (image folder with same-stem .txt captions, img2dataset parquet, or webdataset tars; "
        "local or s3://) through decode, quality, dedup, CLIP scores, captioning, crop and degradation into "
        "OUTPUT/shards/*.parquet, OUTPUT/rejects/*.parquet and OUTPUT/manifest.json. Re-running resumes; a completed "
        "build is a no-op. Connects to RAY_ADDRESS / ray.address, else starts the embedded local Ray.",
        epilog="example: restoray data build --input data/samples --output /tmp/ds --set data.degrade.variants=1",
    )
    build.add_argument("--input", required=True, metavar="URI", help="corpus: a folder, .parquet file(s), .tar shards; local or s3://")
    build.add_argument("--output", required=True, metavar="URI", help="dataset directory, local or s3://")
    build.add_argument("--report", metavar="PATH", default=None, help="also write an HTML report (examples, score histograms)")
    build.add_argument(
        "--retry-rejected",
        metavar="REASON[,REASON]",
        default="",
        help="read the sources rejected for these reasons again (e.g. read_error after a storage outage); reasons: " + ", ".join(REASONS),
    )
    _add_config_arguments(build)
    build.set_defaults(handler=_run_data_build)

    index = commands.add_parser("index", help="reference index jobs (build, query)", description="The ReFIR reference index.")
    index_commands = index.add_subparsers(dest="index_command", metavar="JOB", required=True)
    index_build = index_commands.add_parser(
        "build",
        help="corpus or dataset -> open-clip embeddings, reference store, faiss index tuned to a recall target",
        description="Embed every source of a corpus (any source `data build` reads; local or s3://) or of a dataset built by "
        "`data build` (its accepted sources, once each) with the preset's open-clip model on Ray Data, store each image at the "
        "restoration model's size, and build a faiss index chosen by the vector count and index.max_memory, with search "
        "parameters tuned to index.target_recall (10-recall@10). Writes OUTPUT/index.faiss, vectors.npy, embeddings/, "
        "references/, rejects/ and manifest.json. Re-running resumes the embedding; a completed build is a no-op. Every "
        "[index] key: `restoray list config`.",
        epilog="example: restoray index build --input data/samples --output data/index\n"
        "         restoray index build --input data/demo/dataset --embeddings data/demo/dataset --output data/index",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    index_build.add_argument("--input", required=True, metavar="URI", help="corpus (folder, parquet, webdataset) or a data build output")
    index_build.add_argument("--output", required=True, metavar="URI", help="index directory, local or s3://")
    index_build.add_argument(
        "--embeddings", metavar="URI", default=None, help="reuse the embeddings a data build stored (the dataset or its embeddings/)"
    )
    index_build.add_argument(
        "--index-type", choices=("flat", "hnsw", "ivf", "ivf_pq"), default=None, help="force an index type (default: by count and memory)"
    )
    _add_config_arguments(index_build)
    index_build.set_defaults(handler=_run_index_build)
    index_query = index_commands.add_parser(
        "query",
        help="the nearest references of an image",
        description="Embed IMAGE with the index's open-clip model and print the k nearest sources with their cosine similarity.",
        epilog="example: restoray index query photo.png --index data/index -k 3",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    index_query.add_argument("image", metavar="IMAGE", help="query image file")
    index_query.add_argument("--index", required=True, metavar="URI", help="index directory (local or s3://)")
    index_query.add_argument("-k", type=int, default=5, help="references to return (default 5)")
    _add_config_arguments(index_query)
    index_query.set_defaults(handler=_run_index_query)

    train = commands.add_parser(
        "train",
        help="train a stage (adaptor, encoder, experts, estimator) on Ray Train + DeepSpeed, tracked in MLflow",
        description="Train one stage from the shards of `restoray data build` with Ray Train workers running "
        "DeepSpeed ZeRO (on CPU over gloo when train.gpus_per_worker = 0). Checkpoints go to "
        "train.storage_path/<name>; rerunning the same name resumes from the latest checkpoint; the result is "
        "logged to MLflow and registered as restoray-<stage>. Every [train] key: `restoray list config`.",
        epilog="example: restoray train --set train.steps=20 --set train.stage=encoder",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_config_arguments(train)
    train.set_defaults(handler=_run_train)

    restore = commands.add_parser(
        "restore",
        help="restore one image with the restoration model",
        description="Restore an image: robust encoding, captioning (unless --prompt), restoration-guided EDM sampling with the "
        "adaptor, optional ReFIR references, colour fix. Weights: a directory saved by training, s3://, models:/NAME/VERSION, "
        "or none (the preset's untrained adaptor).",
        epilog="example: restoray restore data/samples/coffee.png --output out.png --preset tiny --steps 10\n\n"
        "Every sampler and restore setting is also a config key: --set sampler.s_churn=0 --set restore.gate_scale=0.5 "
        "(`restoray list config`); the flags above win over the config.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    restore.add_argument("input", metavar="INPUT", help="image file (any format the dataset build reads)")
    restore.add_argument("--output", required=True, metavar="PATH", help="where to write the restored image (PNG/JPEG by extension)")
    restore.add_argument("--prompt", default=None, help="semantic prompt (default: caption the stage-1 image with the preset's VLM)")
    restore.add_argument(
        "--restoration-prompt",
        default=None,
        help="SPIRE restoration prompt (default: restore.restoration_prompt, 'Remove all degradation')",
    )
    restore.add_argument("--reference", action="append", default=[], metavar="PATH", help="ReFIR reference image (repeatable)")
    restore.add_argument(
        "--references",
        choices=("none", "auto"),
        default=None,
        help="auto: retrieve ReFIR references from --index (the nearest to the stage-1 image, kept only at or above "
        "--min-similarity; below it the image is restored without one)",
    )
    restore.add_argument("--index", metavar="URI", default=None, help="reference index for --references auto (local or s3://)")
    restore.add_argument(
        "--retrieval-k", type=int, default=None, metavar="N", help="references to retrieve (default: restore.retrieval_k, 1)"
    )
    restore.add_argument(
        "--min-similarity",
        type=float,
        default=None,
        metavar="F",
        help="cosine threshold of retrieved references (default: restore.min_similarity)",
    )
    restore.add_argument("--tau-r", type=float, default=None, help="restoration-guidance exponent, 0 or less: off (default: sampler.tau_r)")
    restore.add_argument(
        "--sampler", metavar="PRESET", default=None, help="sampler preset (`restoray list samplers`: supir-paper, supir-release)"
    )
    restore.add_argument("--steps", type=int, default=None, help="sampling steps (default: sampler.steps)")
    restore.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale >= 1 (default: sampler.cfg)")
    restore.add_argument("--seed", type=int, default=None, help="random seed (default: restore.seed)")
    restore.add_argument("--upscale", type=float, default=None, help="super-resolution factor: output = input size x F (default 1)")
    restore.add_argument(
        "--min-size", type=int, default=None, metavar="PX", help="restore at least at this short side (default: the preset's native size)"
    )
    restore.add_argument(
        "--experts",
        default=None,
        metavar="MODE",
        help="blending of ABAIR LoRA experts, if the weights have any: soft, one_hot (from the estimator), or oracle "
        "weights such as noise=1 or noise=0.7,blur=0.3",
    )
    restore.add_argument("--weights", metavar="URI", default=None, help="trained weights: path, s3:// or models:/NAME/VERSION")
    restore.add_argument("--preset", default=None, help="model preset when no --weights are given (default: the config's)")
    _add_config_arguments(restore)
    restore.set_defaults(handler=_run_restore)

    batch = commands.add_parser(
        "restore-batch",
        help="restore every image of a corpus with a Restorer actor pool on Ray Data",
        description="Restore every image of a corpus (any source `data build` reads: folder, parquet, webdataset; local or "
        "s3://) with a pool of Restorer actors ([restore_batch]: actors, batch_size, num_cpus, num_gpus, output_format; "
        "images of one working size share a batched forward pass). Writes OUTPUT/images/<name> (named after the source), "
        "OUTPUT/results/*.parquet (source, output, caption, references, seed, model, seconds), OUTPUT/rejects/*.parquet "
        "and OUTPUT/manifest.json. Re-running resumes; a completed job is a no-op. Sampler and restore flags as for "
        "`restoray restore`.",
        epilog="example: restoray restore-batch --input data/samples --output /tmp/restored --steps 10 --set restore.upscale=2",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    batch.add_argument("--input", required=True, metavar="URI", help="corpus: a folder, .parquet file(s), .tar shards; local or s3://")
    batch.add_argument("--output", required=True, metavar="URI", help="output directory, local or s3://")
    batch.add_argument("--weights", metavar="URI", default=None, help="trained weights: path, s3:// or models:/NAME/VERSION")
    batch.add_argument("--preset", default=None, help="model preset when no --weights are given (default: the config's)")
    batch.add_argument("--references", choices=("none", "auto"), default=None, help="auto: a ReFIR reference per image from --index")
    batch.add_argument("--index", metavar="URI", default=None, help="reference index for --references auto (local or s3://)")
    batch.add_argument("--prompt", default=None, help="one semantic prompt for every image (default: caption each stage-1 image)")
    batch.add_argument("--restoration-prompt", default=None, help="SPIRE restoration prompt (default: restore.restoration_prompt)")
    batch.add_argument("--sampler", metavar="PRESET", default=None, help="sampler preset (`restoray list samplers`)")
    batch.add_argument("--steps", type=int, default=None, help="sampling steps (default: sampler.steps)")
    batch.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale >= 1 (default: sampler.cfg)")
    batch.add_argument("--tau-r", type=float, default=None, help="restoration-guidance exponent, 0 or less: off")
    batch.add_argument("--seed", type=int, default=None, help="random seed of every image (default: restore.seed)")
    batch.add_argument("--upscale", type=float, default=None, help="super-resolution factor (default 1)")
    batch.add_argument("--experts", default=None, metavar="MODE", help="ABAIR experts: soft, one_hot or name=weight[,...]")
    _add_config_arguments(batch)
    batch.set_defaults(handler=_run_restore_batch)

    evaluation = commands.add_parser(
        "eval",
        help="evaluate a model on a protocol, or score folders you have (eval score); eval compare RUN_A RUN_B",
        description="Build a protocol's test set from --data (a seeded degradation of each HQ image, paired LQ and HQ "
        "folders, or real LQ images without a reference; `restoray list protocols`, or --protocol PATH to a protocol file "
        "of your own), restore it with the restore-batch job, score every case against its original HQ in the "
        "protocol's metric convention on Ray, write OUTPUT/scores.parquet and OUTPUT/report.html and log an MLflow run "
        "(experiment restoray-eval). PSNR and SSIM need no weights; LPIPS, DISTS, FID (and CLIP-IQA, MUSIQ, "
        "NIQE with the iqa extra; MANIQA is refused) take local files (--set eval.weights.lpips=PATH ...) and are listed as skipped "
        "without them.\n\n"
        "`restoray eval score --pred DIR --gt DIR` scores images you already have the same way (pairs matched by path "
        "without extension, or through a restore-batch output's results/ when --pred is one; a file without its pair "
        "is refused; without --gt, the no-reference metrics). `restoray eval compare RUN_A RUN_B` prints two runs' "
        "metrics with deltas.\n\n"
        "Conventions (--convention; PSNR/SSIM as each reference implementation computes them):\n"
        + "".join(f"  {name:<9} {text}\n" for name, text in CONVENTIONS.items()),
        epilog="examples:\n"
        "  restoray eval --weights models:/restoray-adaptor/1 --protocol realesrgan-x4 --data data/samples --output /tmp/e\n"
        "  restoray eval --weights models:/restoray-adaptor/1 --protocol ./my-div2k.toml --data /data/DIV2K --output /tmp/d\n"
        "  restoray eval score --pred results/ --gt HR/ --convention basicsr --crop-border 4 --output /tmp/s\n"
        "  restoray eval compare 3f2a... 9c1b...",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    evaluation.add_argument("action", nargs="*", metavar="score | compare RUN_A RUN_B", help="score folders, or compare two eval runs")
    evaluation.add_argument("--weights", metavar="URI", default=None, help="trained weights: path, s3:// or models:/NAME/VERSION")
    evaluation.add_argument("--preset", default=None, help="model preset when no --weights are given (default: the config's)")
    evaluation.add_argument(
        "--protocol", metavar="NAME|PATH", default=None, help="evaluation protocol (`restoray list protocols`) or a protocol .toml file"
    )
    evaluation.add_argument("--data", metavar="URI", default=None, help="HQ images (synthetic protocols) or the paired protocol's folders")
    evaluation.add_argument("--output", metavar="URI", default=None, help="where the test set, restorations and scores go")
    evaluation.add_argument("--steps", type=int, default=None, help="sampling steps (default: sampler.steps)")
    evaluation.add_argument("--sampler", metavar="PRESET", default=None, help="sampler preset (`restoray list samplers`)")
    evaluation.add_argument("--seed", type=int, default=None, help="random seed of the restorations (default: restore.seed)")
    evaluation.add_argument(
        "--index",
        metavar="URI",
        default=None,
        help="evaluate ReFIR: references from this index per case (restore.min_similarity)",
    )
    scoring = evaluation.add_argument_group("eval score, and scoring overrides for eval")
    scoring.add_argument("--pred", metavar="URI", default=None, help="the images to score (a folder or a restore-batch output)")
    scoring.add_argument("--gt", metavar="URI", default=None, help="their ground truth, matched by name (absent: no-reference)")
    convention_help = "PSNR/SSIM convention (default: the protocol's; score: refir)"
    scoring.add_argument("--convention", choices=list(CONVENTIONS), default=None, help=convention_help)
    crop_help = "pixels cut from each side before scoring (default: the protocol's; score: 0)"
    scoring.add_argument("--crop-border", type=int, default=None, metavar="N", help=crop_help)
    scoring.add_argument("--metrics", default=None, metavar="A,B", help="metrics to score, comma-separated (default: eval.metrics)")
    _add_config_arguments(evaluation)
    evaluation.set_defaults(handler=_run_eval, cfg=None, tau_r=None, restoration_prompt=None, experts=None)

    serve_parser = commands.add_parser(
        "serve",
        help="run the Ray Serve application (HTTP API + web UI) until interrupted",
        description="Run the restoration service on Ray Serve: a FastAPI ingress (POST /v1/restore, /v1/jobs, the web UI "
        "at /, OpenAPI at /docs) over the Restorer (multiplexed model versions on one SDXL base, batched), Captioner and "
        "Retriever deployments. Without a cluster (RAY_ADDRESS / ray.address) it starts the embedded local Ray with the "
        "tiny preset by default, prints the URL and, when auth is on and no token is set, a token it generated. Every "
        "[serve] key (limits, replicas, queues, auth): `restoray list config`.",
        epilog="example: restoray serve --weights models:/restoray-adaptor/1 --index data/demo/index --port 8000\n"
        "         restoray serve --write-config serving/config.yaml   (then: serve deploy serving/config.yaml)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve_parser.add_argument(
        "--weights", metavar="URI", default=None, help="default model: path, s3:// or models:/NAME/VERSION (default: the preset)"
    )
    serve_parser.add_argument("--index", metavar="URI", default=None, help="reference index for references=auto (local or s3://)")
    serve_parser.add_argument("--port", type=int, default=None, metavar="N", help="HTTP port (default: serve.port, 8000)")
    serve_parser.add_argument(
        "--write-config", metavar="PATH", default=None, help="write Serve's config file for these settings and exit (serve run / deploy)"
    )
    _add_config_arguments(serve_parser)
    serve_parser.set_defaults(handler=_run_serve)

    infra = commands.add_parser(
        "infra",
        help="container image tags and KubeRay manifests (image, render, job)",
        description="The cluster side: restoray's container image (infra/docker/) and the KubeRay manifests of a run.",
    )
    infra_commands = infra.add_subparsers(dest="infra_command", metavar="JOB", required=True)
    infra_image = infra_commands.add_parser(
        "image",
        help="print the image tag (or Ray's base image tag) of a variant",
        description="Print restoray's container image tag for a variant, or with --base the Ray image it builds on "
        "(both from restoray/templates/image.toml, the one place they are written). `make image` builds with them.",
    )
    infra_image.add_argument("--variant", default="cpu", metavar="cpu|cuda", help="image variant (default: cpu)")
    infra_image.add_argument("--base", action="store_true", help="print Ray's base image tag instead")
    infra_image.set_defaults(handler=_run_infra_image)
    render = infra_commands.add_parser(
        "render",
        help="render the KubeRay manifests (RayCluster, RayJobs, RayService) of a run config",
        description="Render the KubeRay manifests of a run: a ConfigMap with the config, a RayCluster (CPU head, CPU and "
        "GPU worker groups, autoscaling, token auth through a Secret), RayJobs for data build, index build, train, "
        "restore-batch and eval (on that cluster, or each on its own: infra.job_cluster), and a RayService for the Serve "
        "application. Pod sizes, names, Secrets and the jobs' paths "
        "come from the config's [infra] section (`restoray list config`), training from [train], the Serve app from "
        "[serve]. No credential is written: pods read them from Secrets.",
        epilog="example: restoray infra render --config configs/cluster.example.toml --output infra/kuberay\n"
        "         kubectl apply -f infra/kuberay/",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    render.add_argument("--output", required=True, metavar="DIR", help="folder the manifests are written into")
    _add_config_arguments(render)
    render.set_defaults(handler=_run_infra_render)
    job = infra_commands.add_parser(
        "job",
        help="render one RayJob (data-build, index-build, train, restore-batch, eval) with a fresh name, to run it again",
        description="Render the RayJob of one command, as `infra render` does, named NAME-COMMAND-XXXXX with a fresh "
        "random suffix: a RayJob runs once, and `kubectl apply` of a new name starts the job again without editing a "
        "manifest (kubectl apply cannot use generateName). Names are at most 47 characters (KubeRay's limit).",
        epilog="example: restoray infra job train --config configs/cluster.example.toml | kubectl apply -f -",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    job.add_argument("job", metavar="COMMAND", help="data-build, index-build, train, restore-batch or eval")
    job.add_argument("--output", default=None, metavar="FILE", help="write the manifest here (default: standard output)")
    _add_config_arguments(job)
    job.set_defaults(handler=_run_infra_job)

    convert = commands.add_parser("convert", help="convert released checkpoints (supir)", description="Convert released checkpoints.")
    convert_what = convert.add_subparsers(dest="convert_what", metavar="FORMAT", required=True)
    supir = convert_what.add_parser(
        "supir",
        help="a SUPIR-v0Q/F .ckpt + the SDXL base -> a weights directory",
        description="Convert a released SUPIR-v0Q or SUPIR-v0F checkpoint (loaded with weights_only=True; mask_LQ, if "
        "present, is dropped) and the SDXL base it runs on into a directory that --weights and Restorer.from_pretrained "
        "load. The directory is self-contained and can be moved: the SDXL base is copied into it and its preset names "
        "it relative to the directory.",
        epilog="example: restoray convert supir SUPIR-v0Q.ckpt --sdxl ./sd_xl_base_1.0 --output models/supir-v0q\n"
        "         restoray restore photo.png --weights models/supir-v0q --upscale 2 --output out.png",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    supir.add_argument("checkpoint", metavar="CKPT", help="SUPIR-v0Q.ckpt / SUPIR-v0F.ckpt (or a .safetensors of the same tensors)")
    supir.add_argument(
        "--sdxl",
        required=True,
        metavar="PATH",
        help="the SDXL base: a diffusers folder (unet/, vae/, text_encoder/, text_encoder_2/, ...) or the original single-file "
        "checkpoint SUPIR loads (sd_xl_base_1.0_0.9vae.safetensors), converted offline with SDXL's configs written in restoray",
    )
    supir.add_argument("--output", required=True, metavar="DIR", help="new directory to write (must not exist or be empty)")
    supir.add_argument(
        "--layout", default="supir-v0", metavar="PRESET", help="preset whose adaptor layout receives the weights (default: supir-v0)"
    )
    supir.set_defaults(handler=_run_convert_supir)

    plan = commands.add_parser(
        "plan",
        help="memory and FLOPs of a preset at real size, measured here without weights (fake tensors)",
        description="Build the preset's networks at full size under torch's FakeTensorMode (no weights are read or "
        "allocated; configs come from local directories, the Hugging Face cache or the copies restoray ships) and "
        "measure per phase: parameters, FLOPs (attention included) and peak memory, for restore at --size (stage 1, "
        "prompts, one CFG step, decode), at twice the size with tiled diffusion and the tiled VAE, ReFIR with one "
        "reference, the captioner in its own phase and one adaptor training step at --train-size with ZeRO-2 over "
        "--gpus. From a packaged GPU table it prints what fits where (and with which restore.offload) and lower-bound "
        "seconds (FLOPs / the card's dense bf16 rate). About a minute for an SDXL preset.",
        epilog="examples:\n  restoray plan --preset supir-v0\n  restoray plan --preset sdxl --size 1024 --dtype bf16 --gpus 8 --json\n"
        "  restoray plan --preset supir-v0 --captioner llava-hf/llava-1.5-7b-hf",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    plan.add_argument("--preset", default=None, help="preset name or .toml file (default: sdxl)")
    plan.add_argument("--size", type=int, default=None, metavar="PX", help="restore size, square, multiple of 64 (default: 1024)")
    plan.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None, help="network precision (default: bf16)")
    plan.add_argument("--gpus", type=int, default=None, metavar="N", help="GPUs ZeRO-2 partitions optimizer state over (default: 8)")
    plan.add_argument("--steps", type=int, default=None, metavar="N", help="sampling steps per image (default: 50, SUPIR's)")
    plan.add_argument("--train-size", type=int, default=None, metavar="PX", help="training crop size (default: 512)")
    plan.add_argument("--captioner", default=None, metavar="ID", help="size this captioner instead of the preset's (its config)")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON instead of tables")
    plan.set_defaults(handler=_run_plan)

    listing = commands.add_parser("list", help="list registries (presets, degradations, config keys)", description="List a registry.")
    what = listing.add_subparsers(dest="what", metavar="WHAT", required=True)
    presets = what.add_parser("presets", help="model presets and the networks each one names", description="List the model presets.")
    presets.set_defaults(handler=_list_presets)
    degradations = what.add_parser(
        "degradations",
        help="degradation types with their stable ids (ABAIR experts, mask values)",
        description="List the registered degradation types (built-ins and plugins of the 'restoray.degradations' entry-point group).",
    )
    degradations.set_defaults(handler=_list_degradations)
    samplers = what.add_parser("samplers", help="sampler presets (restore --sampler NAME)", description="List the sampler presets.")
    samplers.set_defaults(handler=_list_samplers)
    protocols = what.add_parser("protocols", help="evaluation protocols (restoray eval --protocol NAME)", description="List the protocols.")
    protocols.set_defaults(handler=_list_protocols)
    config_keys = what.add_parser("config", help="every config key with its type and description", description="List every config key.")
    config_keys.set_defaults(handler=_list_config)

    submit = commands.add_parser(
        "submit",
        help="run a restoray command as a Ray job on a cluster",
        description="Submit `python -m restoray ARGS` as a Ray job (Ray Jobs API) with this project as its working_dir, "
        "stream its logs, and exit with the job's status (0 succeeded, 1 failed or stopped).",
        epilog="example: restoray submit --address http://head:8265 -- demo --set seed=1\n\n"
        "Clusters started with `ray start` use token authentication: the token is read from RAY_AUTH_TOKEN, "
        "RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    submit.add_argument(
        "--address", metavar="URL", default=None, help="Jobs API address (default: RAY_ADDRESS, else http://127.0.0.1:8265)"
    )
    submit.add_argument(
        "--env", metavar="KEY=VALUE", action="append", default=[], help="extra environment variable for the job (repeatable)"
    )
    submit.add_argument("--no-wait", action="store_true", help="print the job id and return without streaming logs")
    submit.add_argument("restoray_args", nargs=argparse.REMAINDER, metavar="-- ARGS", help="the restoray command to run, after --")
    submit.set_defaults(handler=_run_submit)
    return parser


def _list_presets(args: argparse.Namespace) -> int:
    from restoration.models.presets import list_presets

    for preset in list_presets():
        print(f"{preset.name:<8} {preset.description}")
        for name, spec in preset.networks().items():
            if getattr(spec, "source", None):
                origin = spec.source + (f" [{spec.subfolder}]" if spec.subfolder else "")
            elif getattr(spec, "pretrained", None) and isinstance(spec.pretrained, str):
                origin = f"open-clip {spec.architecture} ({spec.pretrained})"
            elif getattr(spec, "vocabulary", None):
                origin = f"built from {spec.vocabulary}"
            else:
                origin = "random init from a small config"
            print(f"    {name:<15} {origin}")
    return 0


def _list_degradations(args: argparse.Namespace) -> int:
    from restoration.degradations import REGISTRY

    print(f"{'id':>3}  {'name':<12} {'severity':<14} {'prompt':<30} description")
    print(f"{0:>3}  {'clean':<12} {'-':<14} {'-':<30} no degradation (mask value)")
    for kind in REGISTRY.all():
        low, high = kind.severity
        print(f"{kind.id:>3}  {kind.name:<12} {f'{low:g}-{high:g}':<14} {kind.phrase:<30} {kind.description}")
    return 0


def _list_samplers(args: argparse.Namespace) -> int:
    from restoration.sampling.presets import list_sampler_presets

    for name, description in list_sampler_presets().items():
        print(f"{name:<16} {description}")
    return 0


def _list_protocols(args: argparse.Namespace) -> int:
    from restoration.evaluation.protocols import list_protocols

    for name, description in list_protocols().items():
        print(f"{name:<20} {description}")
    return 0


def _list_config(args: argparse.Namespace) -> int:
    for key, type_name, description in describe_keys():
        print(f"{key:<24} {type_name:<22} {description}")
    return 0


def _run_data_build(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    from restoray.data import run_data_build

    retry = tuple(reason.strip() for reason in args.retry_rejected.split(",") if reason.strip())
    return run_data_build(config, args.input, args.output, args.report, retry)


def _run_index_build(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    from restoray.index import run_index_build

    return run_index_build(config, args.input, args.output, args.embeddings, args.index_type)


def _run_index_query(args: argparse.Namespace) -> int:
    if args.k < 1:
        raise InputError(f"-k {args.k}: give at least 1")
    config = load_config(args.config, args.overrides)
    from restoray.index import run_index_query

    return run_index_query(config, args.image, args.index, args.k)


def _run_train(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    from restoray.train import run_train

    return run_train(config)


def _run_restore(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    from restoray.restore import run_restore

    return run_restore(config, args)


def _run_restore_batch(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    from restoray.restore_batch import run_restore_batch

    return run_restore_batch(config, args)


def _run_eval(args: argparse.Namespace) -> int:
    if args.metrics is not None:
        args.overrides = [*(args.overrides or []), f"eval.metrics={json.dumps([m.strip() for m in args.metrics.split(',') if m.strip()])}"]
    config = load_config(args.config, args.overrides)
    action = args.action[0] if args.action else None
    if args.crop_border is not None and args.crop_border < 0:
        raise InputError(f"--crop-border must be >= 0, got {args.crop_border}")
    if action == "compare":
        if len(args.action) != 3:
            raise InputError(f"eval compare: give two run ids, got {args.action[1:]}")
        from restoray.evaluate import run_compare

        return run_compare(config, args.action[1], args.action[2])
    if action == "score":
        if len(args.action) != 1 or not args.pred:
            raise InputError("eval score: give --pred DIR (and --gt DIR for the full-reference metrics), no positional arguments")
        from restoray.evaluate import run_score

        return run_score(config, args)
    if action is not None:
        raise InputError(
            f"eval: unexpected {' '.join(args.action)!r}; use `restoray eval score`, `restoray eval compare RUN_A RUN_B` or the options"
        )
    missing = [flag for flag, value in (("--protocol", args.protocol), ("--data", args.data), ("--output", args.output)) if not value]
    if missing:
        raise InputError(f"eval: give {', '.join(missing)} (or `restoray eval score` / `restoray eval compare RUN_A RUN_B`)")
    from restoray.evaluate import run_eval

    return run_eval(config, args)


def _run_serve(args: argparse.Namespace) -> int:
    if args.port is not None and not 0 < args.port < 65536:
        raise InputError(f"--port {args.port}: give a port between 1 and 65535")
    config = load_config(args.config, args.overrides)
    from restoray.serve import run_serve

    return run_serve(config, args)


def _run_infra_image(args: argparse.Namespace) -> int:
    from restoray.infra import run_infra_image

    return run_infra_image(args.variant, args.base)


def _run_infra_job(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    from restoray.infra import run_infra_job

    return run_infra_job(config, args.config, args.overrides, args.job, args.output)


def _run_infra_render(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    from restoray.infra import run_infra_render

    return run_infra_render(config, args.config, args.overrides, args.output)


def _run_convert_supir(args: argparse.Namespace) -> int:
    from restoray.convert import run_convert_supir

    return run_convert_supir(args.checkpoint, args.sdxl, args.output, args.layout)


def _run_plan(args: argparse.Namespace) -> int:
    from restoray.plan import run_plan

    return run_plan(args)


def _run_demo(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    from restoray.demo import run_demo

    return run_demo(config)


def _run_submit(args: argparse.Namespace) -> int:
    from restoray.submit import parse_env, submit

    command = list(args.restoray_args)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise InputError("submit: give the restoray command to run after --, e.g. restoray submit -- demo")
    return submit(command, address=args.address, env=parse_env(args.env), wait=not args.no_wait)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Libraries (open_clip, Ray) log chatter to the root logger at INFO: show warnings from them, INFO from ours.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for package in OUR_PACKAGES:
        logging.getLogger(package).setLevel(logging.DEBUG if args.verbose else logging.INFO)
    # MLflow's artifact progress bars: on a terminal only (in a log they are one line per file).
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "true" if sys.stderr.isatty() else "false")
    started = time.monotonic()
    try:
        code = args.handler(args)
    except RestorayError as err:
        print(f"restoray: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("restoray: interrupted", file=sys.stderr)
        return 130
    log.debug("%s finished in %.1fs", args.command, time.monotonic() - started)
    return code


def entrypoint() -> None:
    sys.exit(main())
