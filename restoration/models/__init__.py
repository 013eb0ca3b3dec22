"""Networks of the method: presets (which networks a run uses) and their builders/loaders."""
