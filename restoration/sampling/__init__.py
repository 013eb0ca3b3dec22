"""Sampling: the restoration-guided EDM loop (tiling and colour fix come with the restorer)."""

from restoration.sampling.edm import SamplerConfig, StepInfo, restoration_guided_sample, schedule_sigmas, step_sigmas

__all__ = ["SamplerConfig", "StepInfo", "restoration_guided_sample", "schedule_sigmas", "step_sigmas"]
