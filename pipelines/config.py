"""Config of the dataset build: one model per stage, gathered in `DataBuildConfig` (the `[data]` table of a run)."""

from __future__ import annotations

from typing import Literal

from pydantic import ByteSize, Field, field_validator, model_validator

from restoration.config_model import StrictModel
from restoration.degradations import CompositeConfig, NegativeConfig, ParameterizedConfig, RealESRGANConfig
from restoration.degradations.sample import DEGRADATION_KINDS
from restoration.images import DEFAULT_MAX_PIXELS


class SourceConfig(StrictModel):
    format: Literal["auto", "folder", "parquet", "webdataset"] = Field(
        "auto", description="Corpus layout; auto: .parquet files -> parquet, .tar files -> webdataset, else an image folder."
    )
    image_column: str = Field("jpg", description="Parquet: column of image bytes, or of paths/URIs to read.")
    caption_column: str = Field("caption", description="Parquet: caption column (missing column = no captions).")
    image_extensions: list[str] = Field(
        [".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp", ".gif"],
        description="Webdataset: member extensions that hold the image. Folders take every file except captions.",
    )
    caption_extensions: list[str] = Field([".txt", ".json"], description="Same-stem caption files (json: its 'caption' key).")
    max_caption_chars: int = Field(2000, ge=1, description="Longer captions are cut for training; the full text stays in alt_text.")
    read_parallelism: int = Field(8, ge=1, description="Read tasks over the listed sources (bounds memory).")
    max_read_error_share: float = Field(
        0.05, ge=0, le=1, description="Stop the build (exit 1) when more than this share of the sources read so far are read_error rejects."
    )
    read_error_min_sources: int = Field(100, ge=1, description="Sources read before the read_error share is checked.")


class DecodeConfig(StrictModel):
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1, description="Refuse images over this many pixels, from the header.")


class QualityConfig(StrictModel):
    min_short_side: int = Field(512, ge=1, description="Reject images whose short side is smaller (too_small).")
    max_aspect_ratio: float = Field(3.0, ge=1, description="Reject long/short side ratios above this (aspect_ratio).")
    min_sharpness: float | None = Field(
        40.0, description="Reject below this Laplacian variance, measured at a 256-px short side (blurry); unset = record only."
    )
    min_jpeg_quality: int | None = Field(60, description="Reject JPEGs whose estimated quality is below (low_jpeg_quality).")
    min_entropy: float | None = Field(3.0, description="Reject grey-level entropies (bits) below this (flat).")


class DedupConfig(StrictModel):
    exact: bool = Field(True, description="Drop byte-identical images (duplicate).")
    perceptual: bool = Field(True, description="Drop perceptual-hash near-duplicates (near_duplicate).")
    max_hamming: int = Field(6, ge=0, le=32, description="64-bit pHash distance up to which images count as near-duplicates.")
    clip_threshold: float | None = Field(
        0.96,
        gt=0,
        le=1,
        description="After the build, drop sources whose CLIP image embedding has cosine >= this with a kept source of "
        "smaller URI (clip_duplicate); unset = no CLIP pass (also off without data.embed.enabled).",
    )
    clusters: int | Literal["auto"] = Field(
        "auto",
        description="Semantic dedup: k-means clusters the CLIP pass compares within; auto: one per ~1,000 embeddings "
        "(at least 1, at most 65,536).",
    )
    assign: int = Field(
        3,
        ge=1,
        le=16,
        description="Semantic dedup: each embedding joins its this-many nearest clusters, so pairs near a cluster "
        "boundary are still compared (recall against the exact pass rises with it; so does the work).",
    )
    kmeans_sample: int = Field(
        262_144, ge=1_000, description="Semantic dedup: embeddings k-means trains on (a random sample; all below it)."
    )

    @field_validator("clusters")
    @classmethod
    def _positive_clusters(cls, value):
        if value != "auto" and value < 1:
            raise ValueError("clusters must be 'auto' or a positive count")
        return value


class EmbedConfig(StrictModel):
    enabled: bool = Field(True, description="Embed images once with the preset's open-clip model.")
    batch_size: int = Field(16, ge=1, description="Images per model call.")
    actors: int = Field(1, ge=1, description="Actor pool size.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per actor.")
    num_cpus: float = Field(0.5, gt=0, description="CPUs per actor.")
    min_aesthetic: float | None = Field(None, description="Reject aesthetic scores below this (low_aesthetic); unset = record only.")
    min_clip_score: float | None = Field(None, description="Reject image-text cosines below this (low_clip_score); unset = record only.")


class CaptionConfig(StrictModel):
    mode: Literal["keep-source", "generate", "generate-and-keep-alt"] = Field(
        "keep-source",
        description="keep-source: use the corpus caption; generate: VLM caption; generate-and-keep-alt: VLM caption, source in alt_text.",
    )
    batch_size: int = Field(4, ge=1, description="Images per VLM call.")
    actors: int = Field(1, ge=1, description="Actor pool size.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per actor.")
    num_cpus: float = Field(0.5, gt=0, description="CPUs per actor.")


class CropConfig(StrictModel):
    size: int = Field(512, ge=16, description="Square training crop, in pixels.")
    mode: Literal["center", "random"] = Field("center", description="Crop position after resizing the short side to `size`.")


class DegradeConfig(StrictModel):
    variants: int = Field(2, ge=1, description="Degraded variants per accepted image.")
    kinds: dict[str, float] = Field(
        {"realesrgan": 0.4, "parameterized": 0.3, "composite": 0.1, "single": 0.15, "degraded_negative": 0.05},
        description="Share of each sample kind among the variants.",
    )
    realesrgan: RealESRGANConfig = Field(default_factory=lambda: RealESRGANConfig(resize_back=True), description="Real-ESRGAN chain.")
    parameterized: ParameterizedConfig = Field(default_factory=ParameterizedConfig, description="SPIRE chain.")
    composite: CompositeConfig = Field(default_factory=CompositeConfig, description="ABAIR composite.")
    degraded_negative: NegativeConfig = Field(
        default_factory=lambda: NegativeConfig(resize_back=True), description="Photos degraded into negative-quality targets."
    )
    image_format: Literal["png", "jpeg"] = Field("png", description="Encoding of hq and lq bytes (jpeg at quality 95).")

    @model_validator(mode="after")
    def _known_kinds(self) -> DegradeConfig:
        unknown = set(self.kinds) - set(DEGRADATION_KINDS)
        if unknown or not self.kinds or any(weight < 0 for weight in self.kinds.values()) or sum(self.kinds.values()) <= 0:
            raise ValueError(
                f"kinds must map some of {', '.join(DEGRADATION_KINDS)} to non-negative weights with a positive sum; got {self.kinds}"
                + (" (generated negatives are data.negatives.count, not a degradation)" if "negative" in unknown else "")
            )
        return self


class NegativesConfig(StrictModel):
    """SUPIR's negative-quality samples: images the preset's SDXL generates from the negative-quality prompt."""

    count: int = Field(0, ge=0, description="Negative samples to generate (kind `negative`); 0 = none.")
    steps: int = Field(30, ge=1, description="SDXL sampling steps per image (diffusers' Euler).")
    guidance: float = Field(7.0, ge=1, description="Classifier-free guidance scale of the generation.")
    size: int | None = Field(None, ge=16, description="Square image side in pixels; unset = data.crop.size.")
    chain: Literal["realesrgan", "parameterized"] = Field("realesrgan", description="Degradation chain that makes each image's LQ.")
    batch_size: int = Field(2, ge=1, description="Images per pipeline call.")
    actors: int = Field(1, ge=1, description="Actor pool size (each holds the SDXL base).")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per actor.")
    num_cpus: float = Field(0.5, gt=0, description="CPUs per actor.")


class WriteConfig(StrictModel):
    max_rows_per_shard: int = Field(1000, ge=1, description="Rows per parquet shard at most.")


class DataBuildConfig(StrictModel):
    """`restoray data build`: corpus -> validated, deduplicated, captioned, degraded training shards."""

    seed: int = Field(0, description="Seed of crops and degradations (each variant's generator derives from it and the source).")
    source: SourceConfig = Field(default_factory=SourceConfig, description="Reading the corpus.")
    decode: DecodeConfig = Field(default_factory=DecodeConfig, description="Decoding and validation.")
    quality: QualityConfig = Field(default_factory=QualityConfig, description="Basic quality filters.")
    dedup: DedupConfig = Field(default_factory=DedupConfig, description="Duplicate removal.")
    embed: EmbedConfig = Field(default_factory=EmbedConfig, description="open-clip embedding and scores.")
    caption: CaptionConfig = Field(default_factory=CaptionConfig, description="Captioning.")
    crop: CropConfig = Field(default_factory=CropConfig, description="Crop to the training size.")
    degrade: DegradeConfig = Field(default_factory=DegradeConfig, description="Degraded variants.")
    negatives: NegativesConfig = Field(default_factory=NegativesConfig, description="SDXL-generated negative-quality samples.")
    write: WriteConfig = Field(default_factory=WriteConfig, description="Shard writing.")


class IndexEmbedConfig(StrictModel):
    batch_size: int = Field(16, ge=1, description="Images per open-clip call.")
    actors: int = Field(1, ge=1, description="Actor pool size (each holds the preset's open-clip model).")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per actor (1 on a GPU cluster).")
    num_cpus: float = Field(0.5, gt=0, description="CPUs per actor.")


class IndexConfig(StrictModel):
    """`restoray index build`: sources -> open-clip embeddings, reference store, faiss index tuned to a recall target.

    Sources are read, decoded and checked with the run's `data.source`, `data.decode` and `data.quality` settings
    (references should be high-quality images, as the training sources)."""

    embed: IndexEmbedConfig = Field(default_factory=IndexEmbedConfig, description="The embedding actor pool.")
    index_type: Literal["flat", "hnsw", "ivf", "ivf_pq"] | None = Field(
        None, description="Force an index type; unset: chosen from the vector count and max_memory (autofaiss's rules)."
    )
    max_memory: ByteSize = Field(ByteSize(16 * 2**30), description="Resident memory the loaded index may take (e.g. '1GB', '512MiB').")
    on_disk: bool | None = Field(None, description="IVF lists on disk (faiss.contrib.ondisk); unset: when they do not fit max_memory.")
    target_recall: float = Field(0.95, gt=0, le=1, description="10-recall@10 the search parameters are tuned to reach.")
    tuning_queries: int = Field(1000, ge=10, description="Held-out queries (embeddings not in the training sample) for tuning.")
    opq_iterations: int = Field(50, ge=1, description="OPQ rotation training iterations (faiss's default 50).")
    add_batch: int = Field(100_000, ge=1, description="Vectors per Ray task adding to a copy of the trained empty index.")
    reference_format: Literal["jpeg", "png"] = Field("jpeg", description="Encoding of the reference store's images (jpeg at quality 95).")
    max_rows_per_shard: int = Field(1000, ge=1, description="Rows per embeddings/references parquet file at most.")


class RestoreBatchConfig(StrictModel):
    """`restoray restore-batch`: the Restorer actor pool and the outputs (the restore settings are [sampler] and
    [restore], as for `restoray restore`)."""

    actors: int = Field(1, ge=1, description="Restorer actors (each holds one model).")
    batch_size: int = Field(4, ge=1, description="Images an actor takes at once; those of one working size share a restore_batch.")
    num_cpus: float = Field(1.0, gt=0, description="CPUs per Restorer actor.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per Restorer actor (fractions share a GPU).")
    output_format: Literal["png", "jpeg"] = Field("png", description="Format of the restored images.")
    max_rows_per_shard: int = Field(256, ge=1, description="Rows per results parquet part.")


class MetricWeights(StrictModel):
    """Local weights of the learned metrics (restoration.evaluation.learned says which file each needs); a metric
    without its file is skipped, never downloaded."""

    lpips: str | None = Field(None, description="torchvision ImageNet weights of the LPIPS backbone (eval.lpips_net).")
    dists: str | None = Field(None, description="torchvision ImageNet VGG16 weights.")
    fid: str | None = Field(
        None, description="NVIDIA's TorchScript InceptionV3 (inception-2015-12-05.pt, clean-fid's) or its folder; loading runs its code."
    )
    clipiqa: str | None = Field(
        None, description="OpenAI's CLIP RN50 (RN50.pt, TorchScript: a file you trust) for pyiqa's CLIP-IQA (the iqa extra)."
    )
    musiq: str | None = Field(None, description="pyiqa's MUSIQ weights (needs the iqa extra).")
    maniqa: str | None = Field(None, description="pyiqa's MANIQA weights (needs the iqa extra).")
    niqe: str | None = Field(None, description="pyiqa's NIQE parameters file (needs the iqa extra).")


class EvalConfig(StrictModel):
    """`restoray eval`: the test set's workers, the metrics and their weights, the prompt of the restorations."""

    workers: int = Field(2, ge=1, description="Ray tasks building a protocol's test set (the same set for any number), and scoring actors.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per scoring actor (the learned metrics run on it); 0: CPU.")
    min_fid_images: int = Field(
        50, ge=2, description="Below this many images FID is still computed but flagged in the table, report and MLflow run "
        "(its covariance is rank-deficient under 2048 images; papers' FIDs are over thousands)."
    )  # fmt: skip
    metrics: list[str] | None = Field(
        None,
        description="Metrics to score; unset: psnr, ssim and every learned metric whose eval.weights file is set (the others "
        "are listed as skipped). A metric named here must be usable (its weights set): otherwise exit 2.",
    )
    weights: MetricWeights = Field(default_factory=MetricWeights)
    lpips_net: Literal["alex", "vgg", "squeeze"] = Field("alex", description="LPIPS backbone (eval.weights.lpips holds its weights).")
    prompt: str | None = Field(None, description="One semantic prompt for every case; unset: the VLM captions each stage-1 image.")
    report: bool = Field(True, description="Write OUTPUT/report.html: LQ / output / HQ side by side with the scores.")
    report_cases: int = Field(24, ge=0, description="Cases shown in the report (the first N by name).")
