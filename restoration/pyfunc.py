"""MLflow pyfunc flavour of `Restorer`, as a loader module: MLflow calls `_load_pyfunc(data_path)` on the model's
data directory (what `Restorer.save_pretrained` wrote). No MLflow import here: the method library stays free of
tracking code, and `mlflow.pyfunc.load_model(...)` works wherever this package is installed.

`predict` takes a DataFrame with an `image` column of encoded image bytes (PNG/JPEG/...) and optional columns
`prompt`, `restoration_prompt`, `steps`, `seed`, `cfg`; it returns a DataFrame with `image` (PNG bytes), `caption`
(the prompt used) and `seed` per row.
"""

from __future__ import annotations

from typing import Any

from restoration.images import decode_image, encode_png

OPTIONAL_COLUMNS = {"prompt": str, "restoration_prompt": str, "steps": int, "seed": int, "cfg": float}
SAMPLER_COLUMNS = ("steps", "cfg")


class RestorerPyfunc:
    def __init__(self, restorer):
        self.restorer = restorer

    def predict(self, model_input: Any, params: dict[str, Any] | None = None):
        import numpy as np
        import pandas as pd
        from PIL import Image

        from restoration.sampling.edm import SamplerConfig

        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        if "image" not in frame.columns:
            raise ValueError(f"model input needs an 'image' column of encoded image bytes; got columns {list(frame.columns)}")
        outputs: dict[str, list] = {"image": [], "caption": [], "seed": []}
        for _, row in frame.iterrows():
            options = {**(params or {})}
            for column, kind in OPTIONAL_COLUMNS.items():
                value = row.get(column)
                if value is not None and not (isinstance(value, float) and np.isnan(value)):
                    options[column] = kind(value)
            sampler = SamplerConfig(**{column: options.pop(column) for column in SAMPLER_COLUMNS if column in options})
            image = Image.fromarray(decode_image(bytes(row["image"])))
            restoration = self.restorer.restore(image, sampler=sampler, **options)
            outputs["image"].append(encode_png(np.asarray(restoration.image)))
            outputs["caption"].append(restoration.caption)
            outputs["seed"].append(restoration.seed)
        return pd.DataFrame(outputs)


def _load_pyfunc(data_path: str) -> RestorerPyfunc:
    from restoration.precision import inference_device
    from restoration.restorer import Restorer

    return RestorerPyfunc(Restorer.from_pretrained(data_path, device=inference_device(), dtype="auto"))
