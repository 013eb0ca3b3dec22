"""The restoration method as a pure torch/numpy library: no Ray, DeepSpeed, MLflow or S3 in here.

Takes local paths and Hugging Face ids; `restoray` resolves remote URIs to local paths before calling in.
"""

__all__ = ["errors", "models"]
