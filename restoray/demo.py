"""`restoray demo`: every stage that exists so far, end to end on the embedded default.

Stages: connect to Ray (the embedded local instance unless a cluster is named), materialise the sample corpus,
list the presets, build the run's preset networks (offline for `tiny`), build a training dataset from the
sample corpus with Ray Data (with an HTML report), build the ReFIR reference index from its sources (the
embeddings the build stored, faiss), train the adaptor for a few steps on it with Ray Train +
DeepSpeed (tracked in MLflow, registered as restoray-adaptor), restore one sample photo with the registered
model and a reference retrieved from the index, evaluate it on the sample photos (realesrgan-x4: PSNR, SSIM and
the learned metrics whose weights are configured, an MLflow run, an HTML report), then start the Ray Serve
application with that model and index, send one request through its HTTP API and stop it. The demo's training
lives in OUTPUT/train and starts afresh on every demo (a new MLflow run).
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

from restoray.config import RunConfig
from restoray.ray_env import cluster_address, connect, loopback_only
from restoray.samples import materialise
from runtime.resolve import resolve

log = logging.getLogger(__name__)
STEPS = 10


def run_demo(config: RunConfig, output_dir: str = "data/demo") -> int:
    if not cluster_address(config.ray):
        loopback_only()
    from pipelines.build_dataset import build_dataset
    from pipelines.report import write_report
    from restoration.models.base import load_captioner, load_clip_scorer, load_sdxl
    from restoration.models.presets import list_presets, load_preset

    started = time.monotonic()
    print(f"[1/{STEPS}] Ray: {connect(config.ray)}")
    images = materialise(config.samples.dir)
    print(f"[2/{STEPS}] sample corpus: {len(images)} photos with captions in {config.samples.dir}/")

    print(f"[3/{STEPS}] presets:")
    for preset in list_presets():
        print(f"      {preset.name:<8} {preset.description}")

    preset = load_preset(config.preset)
    build_started = time.monotonic()
    sdxl = load_sdxl(preset)
    captioner = load_captioner(preset.captioner, preset.tokenizer, seed=preset.seed)
    clip_scorer = load_clip_scorer(preset.clip_scorer, seed=preset.seed)
    networks = {
        "unet": sdxl.unet,
        "vae": sdxl.vae,
        "text_encoder": sdxl.text_encoder,
        "text_encoder_2": sdxl.text_encoder_2,
        "captioner": captioner.model,
        "clip_scorer": clip_scorer.model,
    }
    print(f"[4/{STEPS}] preset {preset.name!r} built in {time.monotonic() - build_started:.1f}s:")
    for name, module in networks.items():
        print(f"      {name:<15} {sum(p.numel() for p in module.parameters()):>12,} parameters")

    dataset, report = Path(output_dir) / "dataset", Path(output_dir) / "dataset-report.html"
    report.parent.mkdir(parents=True, exist_ok=True)
    summary = build_dataset(config.samples.dir, str(dataset), config.data, config.preset, config.storage)
    write_report(str(dataset), str(report))
    print(f"[5/{STEPS}] dataset build (report: {report}):")
    print("\n".join("      " + line for line in summary.table().splitlines()))
    from pipelines.build_index import build_index

    index_dir = Path(output_dir) / "index"
    index_summary = build_index(
        str(dataset), str(index_dir), config.index, config.data, config.preset, config.storage, embeddings_uri=str(dataset)
    )
    print(f"[6/{STEPS}] reference index from the dataset's sources (its stored CLIP embeddings):")
    print("\n".join("      " + line for line in index_summary.table().splitlines()))
    from PIL import Image

    from restoration.precision import dtype_name, inference_device
    from restoration.restorer import Restorer
    from restoration.retrieval.references import ReferenceIndex
    from restoray.train import print_summary, train_from_config

    train_started = time.monotonic()
    train_dir = Path(output_dir) / "train"
    if train_dir.exists():
        shutil.rmtree(train_dir)  # the demo's own previous training: every demo trains (and registers) anew
    train_config = config.model_copy(
        update={"train": config.train.model_copy(update={"data": str(dataset), "storage_path": str(train_dir)})}
    )
    trained = train_from_config(train_config)
    print(f"[7/{STEPS}] trained the {config.train.stage} for {config.train.steps} steps in {time.monotonic() - train_started:.1f}s:")
    print_summary(train_config, trained, indent="      ")

    restore_started = time.monotonic()
    weights = resolve(trained["model"], config.storage, config.mlflow) if trained["model"] else config.preset
    options = config.restore
    restorer = Restorer.from_pretrained(weights, device=inference_device(), dtype=options.dtype, offload=options.offload)
    photo = Image.open(images[0]).convert("RGB")
    photo = photo.resize((photo.width // 4, photo.height // 4))  # a quick restore on CPU
    sampler = config.sampler.model_copy(update={"steps": 4})  # a quick restore on CPU
    index = ReferenceIndex.load(index_dir)
    restored = restorer.restore(photo, references="auto", index=index, sampler=sampler, options=config.restore)
    restored_path = Path(output_dir) / f"restored-{images[0].stem}.png"
    restored.image.save(restored_path)
    took = time.monotonic() - restore_started
    precision = f"{dtype_name(restorer.dtype)} on {restorer.device.type} (restore.dtype {options.dtype})"
    print(f"[8/{STEPS}] restored {images[0].name} with {trained['model'] or config.preset}, {precision} -> {restored_path} in {took:.1f}s")
    retrieval = restored.retrieval
    if retrieval.fell_back:
        print(f"      reference: none at or above min_similarity {retrieval.min_similarity:g}: restored without one")
    else:
        print("      reference: " + ", ".join(f"{Path(ref.source).name} (cosine {ref.similarity:.4f})" for ref in retrieval.used))
    eval_demo(config, weights, trained["model"] or config.preset, images, Path(output_dir))
    # The registered version when there is one: the Restorer replica resolves models:/ itself (and names the version).
    serve_demo(config, trained["model"] or weights, index_dir, photo, trained["model"] or config.preset)
    print(f"demo finished in {time.monotonic() - started:.1f}s")
    return 0


def eval_demo(config: RunConfig, weights: str, model_name: str, images: list[Path], output_dir: Path) -> None:
    """`restoray eval` of the trained model: the realesrgan-x4 protocol on the sample photos, scaled to 128 px on
    the long side (a quick CPU run: 32 px LQ restored to 128 px)."""
    from PIL import Image

    from pipelines.evaluate import evaluate

    started = time.monotonic()
    hq, output = output_dir / "eval-hq", output_dir / "eval"
    for folder in (hq, output):  # the previous demo's model and restorations: this demo trained a new one
        if folder.exists():
            shutil.rmtree(folder)
    hq.mkdir(parents=True)
    for path in images:
        photo = Image.open(path).convert("RGB")
        scale = 128 / max(photo.size)
        photo.resize((max(4, round(photo.width * scale)), max(4, round(photo.height * scale))), Image.LANCZOS).save(hq / path.name)
    sampler = config.sampler.model_copy(update={"steps": 4})
    summary = evaluate(
        weights, model_name, "realesrgan-x4", str(hq), str(output), config.eval, config.restore_batch, config.data, sampler,
        config.restore, config.storage, config.mlflow,
    )  # fmt: skip
    print(
        f"[9/{STEPS}] evaluated {model_name} on the sample photos at 128 px (protocol realesrgan-x4) in {time.monotonic() - started:.1f}s:"
    )
    print("\n".join("      " + line for line in summary.table().splitlines()))


def serve_demo(config: RunConfig, weights: str, index_dir: Path, photo, model_name: str) -> None:
    """Start the service on a free loopback port, restore one image through POST /v1/restore, stop it."""
    import base64
    import io

    import requests

    from restoray.serve import app_config, free_port, start_service

    serve_started = time.monotonic()
    app = app_config(config, weights=weights, index=str(index_dir), port=free_port())
    app = app.model_copy(update={"serve": app.serve.model_copy(update={"host": "127.0.0.1"})})
    service = start_service(config, app)
    try:
        buffer = io.BytesIO()
        photo.save(buffer, format="PNG")
        headers = {"Accept": "application/json"}
        if service.token:
            headers["Authorization"] = f"Bearer {service.token}"
        response = requests.post(
            f"{service.url}/v1/restore",
            files={"image": ("photo.png", buffer.getvalue(), "image/png")},
            data={"steps": "4", "references": "auto"},
            headers=headers,
            timeout=300,
        )
        if response.status_code != 200:
            raise RuntimeError(f"the demo request got {response.status_code}: {response.text[:500]}")
        body = response.json()
        took = time.monotonic() - serve_started
        print(f"[10/{STEPS}] served {model_name} at {service.url} (web UI at /, API docs at /docs); one POST /v1/restore:")
        print(
            f"      {response.status_code}, {body['width']}x{body['height']} {body['format']}, model version "
            f"{response.headers['X-Restoray-Model-Version']}, {len(base64.b64decode(body['image'])):,} bytes, "
            f"restore {body['seconds']['total']:.2f}s; service up, request and stop in {took:.1f}s"
        )
        print(f"      caption (Captioner deployment): {body['caption']!r}")
        if body["retrieval"] and not body["retrieval"]["fell_back"]:
            print(f"      reference (Retriever deployment): {', '.join(Path(ref['source']).name for ref in body['references'])}")
    finally:
        service.stop()
