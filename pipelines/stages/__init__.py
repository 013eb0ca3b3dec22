"""One module per dataset-build stage, in DESIGN.md's order: decode, quality, dedup, embed, caption, score, crop, degrade."""
