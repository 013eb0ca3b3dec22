"""ReFIR: training-free retrieval augmentation (cross-image injection into the decoder's self-attention)."""
